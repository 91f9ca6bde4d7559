"""ExpertParallelMoE: one MoE layer whose experts are spread over the ranks of a process group.

Data-parallel tokens, expert-parallel weights: every rank routes its own T tokens with the (replicated)
router, sends each (token, slot) row to the rank owning the expert, runs its own experts on what arrives,
and gets its rows back; its output equals the single-device MoE on its tokens. Shared experts are replicated
and run locally. ``apply_expert_parallel`` builds one from a ``tilemoe.MoE`` holding all experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tilemoe.config import MoEConfig
from tilemoe.distributed.epmoe import EPDispatcher
from tilemoe.distributed.placement import ExpertPlacement
from tilemoe.distributed.runtime import check_consistent, group_timeout
from tilemoe.functional import experts_forward, shared_experts_forward
from tilemoe.impls import available_impls
from tilemoe.module import add_moe_parameters
from tilemoe.ops.route import route_tokens

BACKENDS = ("epmoe", "fused")
# best first: tilemoe's Triton kernels, then torch's grouped GEMM, then the grouped loop
LOCAL_IMPL_ORDER = ("triton", "torch_grouped_mm", "grouped", "reference")


def best_local_impl(device: torch.device | str) -> str:
    """The fastest single-device implementation available on ``device`` for the local experts."""
    names = available_impls(device)
    if torch.device(device).type != "cuda":  # on CPU Triton runs in its interpreter: slowest of all
        names = [n for n in names if n != "triton"]
    for name in LOCAL_IMPL_ORDER:
        if name in names:
            return name
    raise ValueError(f"local_impl: none of {LOCAL_IMPL_ORDER} is available on {device} (available: {names})")


class ExpertParallelMoE(nn.Module):
    """One MoE layer with expert-parallel weights.

    Parameters on each rank (E_local = experts this rank owns under ``placement``):
        router_weight [E, H] (+ router_bias [E]), correction_bias [E] buffer: replicated
        w13 [E_local, 2I, H], w2 [E_local, H, I] (+ b13, b2): this rank's experts, in global-id order
        shared_w13 / shared_w2 / shared_gate: replicated

    Args:
        config: the full layer's MoEConfig (all E experts); must be equal on every rank.
        group: expert-parallel process group (None: the default group).
        backend: "epmoe" (all_to_all_single; NCCL or gloo) or "fused" (CUDA only: device-initiated puts into
            symmetric memory, expert GEMMs waiting on per-block flags, outputs stored straight back into the
            source; no host sync, CUDA-graph capturable; see ``fused_backend``; needs max_tokens).
        symm_mem_backend: the fused backend's symmetric memory, "cuda" (default) or "nvshmem" (one host;
            NVSHMEM_REMOTE_TRANSPORT=none etc., see docs/expert_parallel.md). The fused path runs its own
            expert kernels (``fused_kernels``); ``local_impl`` is not used by it.
        fused_tiles: the fused backend's ``fused_ops.FusedTiles`` (same on every rank); default None: from the
            tuner for this shape at max_tokens (``fused_ops.fused_tiles_for``).
        placement: ExpertPlacement (default contiguous over the group).
        max_tokens / capacity: give either for the fixed-capacity (padded, no host sync, CUDA-graph
            capturable) dispatch; capacity defaults to max_tokens * K (dropless). Neither: dynamic, dropless.
        local_impl: implementation of the local experts ("auto": ``best_local_impl``).
        tp_size: EP + TP. The group's ranks form ep = size / tp_size expert-parallel groups of tp_size ranks;
            rank r is tp rank r % tp_size of EP rank r // tp_size, holds that EP rank's experts split along I
            (1/tp_size of the gate, up and w2 columns). Forward: all-gather the tokens of the TP group, EP
            dispatch among the ranks of the same tp rank, partial expert outputs, combine, all-reduce over the
            TP group, keep this rank's rows. Dynamic (dropless) dispatch only.
    Raises:
        ValueError on a bad argument, or (on every rank) when config / placement / backend / capacity / dtype
        differ between ranks, naming the field and the ranks.
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup | None = None,
        backend: str = "epmoe",
        *,
        placement: ExpertPlacement | None = None,
        max_tokens: int | None = None,
        capacity: int | None = None,
        local_impl: str = "auto",
        tp_size: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        symm_mem_backend: str = "cuda",
        fused_tiles=None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "fused" and (max_tokens is None or tp_size != 1 or capacity is not None):
            raise ValueError(
                "backend 'fused': expected max_tokens (its symmetric buffers are sized at init), no capacity and "
                f"tp_size 1, got max_tokens={max_tokens}, capacity={capacity}, tp_size={tp_size}"
            )
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (see tilemoe.distributed.init_distributed)")
        self.config = config
        self.group = group
        self.backend = backend
        world = dist.get_world_size(group)
        if not isinstance(tp_size, int) or tp_size < 1 or world % tp_size:
            raise ValueError(f"tp_size: expected a positive divisor of the group size {world}, got {tp_size!r}")
        if config.intermediate_size % tp_size:
            raise ValueError(
                f"tp_size: expected a divisor of intermediate_size ({config.intermediate_size}), got {tp_size}"
            )
        if tp_size > 1 and (max_tokens is not None or capacity is not None):
            raise ValueError("max_tokens/capacity: the fixed-capacity dispatch is not supported with tp_size > 1")
        self.tp_size = tp_size
        self.tp_rank = dist.get_rank(group) % tp_size
        self.tp_group, ep_group = _tp_ep_groups(group, tp_size)
        self.ep_group = ep_group
        self.rank = dist.get_rank(ep_group)
        self.ep_size = dist.get_world_size(ep_group)
        self.placement = placement or ExpertPlacement.contiguous(config.num_experts, self.ep_size)
        if self.placement.num_experts != config.num_experts:
            raise ValueError(
                f"placement: expected a map of {config.num_experts} experts, got {self.placement.num_experts}"
            )
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: expected None or a positive int, got {max_tokens!r}")
        if capacity is None and max_tokens is not None:
            capacity = max_tokens * config.top_k
        self.max_tokens = max_tokens
        self.local_experts = self.placement.experts_of(self.rank)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.local_impl = best_local_impl(device) if local_impl == "auto" else local_impl
        check_consistent(
            {
                **{f"config.{key}": value for key, value in config.to_dict().items()},
                "placement": self.placement.owner,
                "ep_size": self.ep_size,
                "tp_size": tp_size,
                "backend": backend,
                "capacity": capacity,
                "max_tokens": max_tokens,
                "dtype": str(dtype),
                "symm_mem_backend": symm_mem_backend if backend == "fused" else None,
                "fused_tiles": repr(fused_tiles) if backend == "fused" else None,
            },
            group,
        )
        self.dispatcher = EPDispatcher(self.placement, ep_group, capacity=capacity)
        self.fused = None
        if backend == "fused":
            from tilemoe.distributed.fused_backend import FusedDispatcher

            self.fused = FusedDispatcher(
                self.placement, ep_group, max_tokens=max_tokens, config=config,
                dtype=dtype or torch.get_default_dtype(), device=device, symm_mem_backend=symm_mem_backend,
                tiles=fused_tiles,
            )  # fmt: skip

        n = len(self.local_experts)
        i = config.intermediate_size // tp_size
        add_moe_parameters(self, config, num_local_experts=n, tp_size=tp_size, dtype=dtype, device=device)
        self._local_config = config.replace(
            num_experts=max(1, n), top_k=1, intermediate_size=i, name=f"{config.name}-ep{self.rank}"
        )
        self.last_handle = None
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    # ------------------------------------------------------------------ forward
    def local_experts_forward(self, recv_x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor):
        """This rank's experts on received rows: recv_x [R, H], local_ids [R], weights [R] -> [R, H] weighted."""
        if len(self.local_experts) == 0 or recv_x.shape[0] == 0:
            return recv_x.new_zeros(recv_x.shape)
        return experts_forward(
            recv_x,
            self.w13,
            self.w2,
            weights.unsqueeze(1),
            local_ids.unsqueeze(1),
            config=self._local_config,
            impl=self.local_impl,
            b13=self.b13,
            b2=self.b2,
        )

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Routed experts only, routing given: x [T, H], topk_weights [T, K], topk_ids [T, K] -> [T, H].

        Collective: every rank of the group must call it (T may differ, 0 included). With a fixed capacity,
        T must be <= max_tokens (ValueError naming T otherwise).
        """
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.hidden_size:
            raise ValueError(f"x: expected [T, {c.hidden_size}], got {list(x.shape)}")
        if topk_ids.shape != (x.shape[0], c.top_k):
            raise ValueError(f"topk_ids: expected [{x.shape[0]}, {c.top_k}], got {list(topk_ids.shape)}")
        if self.max_tokens is not None and x.shape[0] > self.max_tokens:
            raise ValueError(
                f"x: {x.shape[0]} tokens exceed max_tokens={self.max_tokens} this layer's buffers were sized for"
            )
        if self.tp_size > 1:
            return self._forward_routed_tp(x, topk_weights, topk_ids)
        if self.fused is not None:
            return self.fused.forward(x, topk_ids, topk_weights, self.w13, self.w2, self.b13, self.b2)
        recv_x, meta, handle = self.dispatcher.dispatch(x, topk_ids, topk_weights)
        y = self.local_experts_forward(recv_x, meta.local_ids, meta.weights)
        self.last_handle = handle
        return self.dispatcher.combine(y, handle, apply_weights=False)

    def _forward_routed_tp(self, x, topk_weights, topk_ids):
        """EP + TP: 1. all-gather the TP group's tokens (sizes first); 2. EP dispatch / partial experts (this
        rank's I slice) / combine over the ranks of the same tp rank; 3. all-reduce the partial outputs over
        the TP group (all-reduce, not reduce-scatter: gloo has no reduce-scatter) and keep this rank's rows."""
        tp, g = self.tp_size, self.tp_group
        sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(tp)]
        dist.all_gather(all_sizes, sizes, group=g)
        counts = [int(s) for s in torch.cat(all_sizes).cpu()]
        longest = max(counts)

        def gather(t: torch.Tensor) -> torch.Tensor:
            padded = t.new_zeros((longest, *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(tp)]
            dist.all_gather(parts, padded.contiguous(), group=g)
            return torch.cat([p[:n] for p, n in zip(parts, counts)])

        xs, ws, ids = gather(x), gather(topk_weights.float()), gather(topk_ids.to(torch.int64))
        recv_x, meta, handle = self.dispatcher.dispatch(xs, ids, ws)
        y = self.local_experts_forward(recv_x, meta.local_ids, meta.weights)
        self.last_handle = handle
        out = self.dispatcher.combine(y, handle, apply_weights=False).float()
        dist.all_reduce(out, group=g)
        start = sum(counts[: self.tp_rank])
        return out[start : start + x.shape[0]].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] or [B, S, H] -> same shape: route, experts across ranks, shared experts. Collective."""
        c = self.config
        if x.shape[-1] != c.hidden_size:
            raise ValueError(f"x: expected last dim hidden_size={c.hidden_size}, got shape {list(x.shape)}")
        x2 = x.reshape(-1, c.hidden_size).contiguous()
        # as the one-GPU MoE routes (route_tokens): the router-GEMM kernels and the routing kernel on CUDA, torch
        # elsewhere
        weights, ids = route_tokens(
            x2, self.router_weight, c, router_bias=self.router_bias, correction_bias=self.correction_bias
        )
        out = self.forward_routed(x2, weights, ids)
        if self.shared_w13 is not None:
            out = out + shared_experts_forward(x2, self.shared_w13, self.shared_w2, c, self.shared_gate)
        return out.reshape(x.shape)

    # ------------------------------------------------------------------ statistics
    def load_stats(self) -> dict:
        """Loads of the last forward over the whole group (collective: every rank calls it).

        Returns {"per_expert": [E] ints, "per_rank": [ep] ints (pairs each rank's experts got),
        "max_imbalance_expert": max/mean over experts, "max_imbalance_rank": max/mean over ranks,
        "dropped": pairs dropped group-wide}.
        """
        if self.last_handle is None:
            raise ValueError("load_stats: no forward has run yet")
        h = self.last_handle
        counts = torch.cat([h.expert_counts, h.dropped.reshape(1)]).to(torch.int64)
        if self.tp_rank != 0:  # every tp rank dispatched the same gathered tokens: count them once
            counts.zero_()
        dist.all_reduce(counts, group=self.group)
        per_expert = counts[:-1].cpu()
        owner = self.placement.owner_tensor()
        per_rank = torch.zeros(self.ep_size, dtype=torch.int64).index_add_(0, owner, per_expert)

        def imbalance(v: torch.Tensor) -> float:
            mean = float(v.double().mean()) if v.numel() else 0.0
            return float(v.max()) / mean if mean > 0 else 0.0

        return {
            "per_expert": per_expert.tolist(),
            "per_rank": per_rank.tolist(),
            "max_imbalance_expert": imbalance(per_expert),
            "max_imbalance_rank": imbalance(per_rank),
            "dropped": int(counts[-1]),
        }

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"E={c.num_experts} (local {self.local_experts}), K={c.top_k}, H={c.hidden_size}, "
            f"I={c.intermediate_size}, ep={self.ep_size}, rank={self.rank}, backend={self.backend!r}, "
            f"tp={self.tp_size}, capacity={self.dispatcher.capacity}, local_impl={self.local_impl!r}"
        )


@torch.no_grad()
def apply_expert_parallel(
    module: nn.Module, group: dist.ProcessGroup | None = None, backend: str = "epmoe", **kwargs
) -> ExpertParallelMoE:
    """The expert-parallel version of a ``tilemoe.MoE`` holding all experts: keeps this rank's experts.

    Weights are copied (the caller may drop ``module`` afterwards). kwargs go to ``ExpertParallelMoE``
    (placement, max_tokens, capacity, local_impl). Raises TypeError when ``module`` is not a tilemoe.MoE.
    """
    from tilemoe.module import MoE

    if not isinstance(module, MoE):
        raise TypeError(f"module: expected a tilemoe.MoE, got {type(module).__name__}")
    ref = module.w13
    layer = ExpertParallelMoE(module.config, group, backend, dtype=ref.dtype, device=ref.device, **kwargs)
    index = torch.tensor(layer.local_experts, dtype=torch.long, device=ref.device)
    layer.router_weight.copy_(module.router_weight)
    for name in ("router_bias", "shared_w13", "shared_w2", "shared_gate"):
        if getattr(layer, name) is not None:
            getattr(layer, name).copy_(getattr(module, name))
    if layer.correction_bias is not None:
        layer.correction_bias.copy_(module.correction_bias)
    shards = tp_shard(
        module.config,
        layer.tp_size,
        layer.tp_rank,
        **{name: None if getattr(module, name) is None else getattr(module, name).index_select(0, index)
           for name in ("w13", "w2", "b13", "b2")},
    )  # fmt: skip
    for name, value in shards.items():
        if value is not None:
            getattr(layer, name).copy_(value)
    return layer


def tp_shard(
    config: MoEConfig,
    tp_size: int,
    tp_rank: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """This tp rank's slice along I of experts' weights: w13 [n, 2I, H] -> [n, 2I/tp, H] (its gate rows, then
    its up rows), w2 [n, H, I] -> [n, H, I/tp], b13 likewise; b2 kept on tp rank 0 only (zeros elsewhere),
    since the TP partial outputs are summed."""
    if tp_size == 1:
        return {"w13": w13, "w2": w2, "b13": b13, "b2": b2}
    i = config.intermediate_size
    step = i // tp_size
    cols = slice(tp_rank * step, (tp_rank + 1) * step)

    def rows(t: torch.Tensor) -> torch.Tensor:  # gate and up halves sliced alike
        if not config.gated:
            return t[:, cols]
        return torch.cat([t[:, :i][:, cols], t[:, i:][:, cols]], dim=1)

    return {
        "w13": rows(w13).contiguous(),
        "w2": w2[:, :, cols].contiguous(),
        "b13": None if b13 is None else rows(b13).contiguous(),
        "b2": None if b2 is None else (b2 if tp_rank == 0 else torch.zeros_like(b2)),
    }


_GROUPS: dict[tuple, tuple] = {}


def _tp_ep_groups(group: dist.ProcessGroup | None, tp_size: int):
    """(tp_group, ep_group) of this rank; (None-like world, group) when tp_size is 1. Every rank of ``group``
    creates every subgroup, in the same order (new_group is collective)."""
    if tp_size == 1:
        return None, group
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    key = (tuple(ranks), tp_size)
    if key not in _GROUPS:
        me = dist.get_rank()
        ep = len(ranks) // tp_size
        tp_group = ep_group = None
        for e in range(ep):  # TP groups: consecutive ranks
            members = ranks[e * tp_size : (e + 1) * tp_size]
            made = dist.new_group(members, timeout=group_timeout())
            if me in members:
                tp_group = made
        for t in range(tp_size):  # EP groups: the same tp rank of every EP rank
            members = ranks[t::tp_size]
            made = dist.new_group(members, timeout=group_timeout())
            if me in members:
                ep_group = made
        _GROUPS[key] = (tp_group, ep_group)
    return _GROUPS[key]


def expert_shard(weights: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """Rows of an [E, ...] tensor for the given global expert ids (contiguous copy)."""
    if not experts:
        return weights[:0].clone()
    return weights.index_select(0, torch.tensor(experts, dtype=torch.long, device=weights.device)).contiguous()
