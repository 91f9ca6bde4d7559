"""``epmoe``: expert-parallel dispatch and combine on ``torch.distributed.all_to_all_single`` (NCCL, gloo).

Every rank holds its own T tokens and the experts ``placement`` gives it. One forward:

1. Flatten the T*K (token, slot) pairs; each pair goes to the owner of its expert. Sort the pairs by
   (destination rank, local expert index) so each destination's rows are one contiguous run.
2. Exchange the per-destination counts (``all_to_all_single`` of ep integers) and read them back to the host:
   the split sizes of the next two exchanges. (The fixed-capacity variant skips this: see below.)
3. ``all_to_all_single`` of the token rows [N, H] and of their metadata [N, 3] int64: local expert index,
   source pair index (t*K + k on the source rank) and the routing weight's float32 bits.
4. The receiver runs its local experts on the rows it got (``tilemoe.experts_forward``, ids local).
5. Reverse ``all_to_all_single`` of the expert outputs, back into the source's sorted pair order.
6. Weighted combine on the source: out[t] = sum_k w[t, k] * y[t*K + k], accumulated in float32.

Fixed capacity (``capacity=C``): every (source, destination) pair of ranks gets C rows, padded, so all
exchanges have equal splits known on the host and nothing reads the device: CUDA-graph capturable.
C = max_tokens * K (the default when ``max_tokens`` is given) can never drop a pair (all K experts of every
token on one rank); a smaller C drops the pairs past it (counted in ``handle.dropped``), and padding costs
expert compute: each rank runs its experts on ep * C rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tilemoe.distributed.placement import ExpertPlacement


@dataclass
class RecvMeta:
    """What each received row is. R rows (R = ep * capacity in fixed-capacity mode).

    local_ids [R] int64   index among this rank's experts (padding rows: 0)
    weights   [R] float32 routing weight of the pair (padding rows: 0)
    src_rank  [R] int64   rank the row came from
    src_slot  [R] int64   t*K + k on the source rank (padding rows: -1)
    """

    local_ids: torch.Tensor
    weights: torch.Tensor
    src_rank: torch.Tensor
    src_slot: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.src_slot >= 0


@dataclass
class DispatchHandle:
    """State ``combine`` needs to bring expert outputs home (opaque to callers)."""

    num_tokens: int
    top_k: int
    topk_weights: torch.Tensor  # [T, K] float32
    order: torch.Tensor  # [T*K] pair indices sorted by (destination, local expert)
    send_splits: list[int] | None  # dynamic mode: rows sent to each rank
    recv_splits: list[int] | None  # dynamic mode: rows received from each rank
    slot_of_pair: torch.Tensor | None  # fixed capacity: [T*K] row in the send buffer (ep*C = dropped)
    capacity: int | None
    expert_counts: torch.Tensor  # [E] int64: this rank's pairs per global expert (before any drop)
    dropped: torch.Tensor  # [] int64: pairs dropped for lack of capacity (0 when dropless)


class EPDispatcher:
    """Dispatch / combine of token rows between expert-parallel ranks over all_to_all_single.

    ``dispatch(x, topk_ids, topk_weights) -> (recv_x, recv_meta, handle)``;
    ``combine(y, handle, apply_weights=True) -> out [T, H]``, where y [R, H] are the expert outputs of recv_x
    in the same row order (the DeepEP / pplx-kernels shape).

    Args:
        placement: which rank owns which expert; ``placement.ep_size`` must equal the group's size.
        group: the expert-parallel process group (None: the default group).
        capacity: None (dropless, one host sync per forward for the split sizes) or rows per
            (source, destination) pair of ranks (fixed shapes, no host sync).
    """

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup | None = None, capacity: int | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        if placement.ep_size != self.ep_size:
            raise ValueError(f"placement.ep_size: expected the group size {self.ep_size}, got {placement.ep_size}")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity: expected None or a positive int, got {capacity!r}")
        self.placement = placement
        self.capacity = capacity
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _owner_local(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = (
                self.placement.owner_tensor(device),
                self.placement.local_index_tensor(device),
            )
        return self._tables[device]

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        """Send every (token, slot) row to the rank owning its expert.

        x [T, H]; topk_ids [T, K] integer in [0, E); topk_weights [T, K] float.
        Returns recv_x [R, H] (x.dtype), its RecvMeta and the handle for ``combine``.
        Raises ValueError on mismatched shapes; with ``capacity`` set, T*K must fit (ValueError naming T).
        """
        if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"dispatch: expected x [T, H] and topk_ids [T, K] with the same T, got x {list(x.shape)}, "
                f"topk_ids {list(topk_ids.shape)}"
            )
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights: expected shape {list(topk_ids.shape)} like topk_ids, got {list(topk_weights.shape)}"
            )
        t, k = topk_ids.shape
        h = x.shape[1]
        device = x.device
        ep = self.ep_size
        owner, local_index = self._owner_local(device)
        max_local = max(1, self.placement.max_local)

        ids = topk_ids.reshape(-1).long()
        dest = owner[ids]
        local = local_index[ids]
        order = torch.sort(dest * max_local + local, stable=True)[1]
        dest_sorted = dest[order]
        # scatter_add, not bincount: CUDA bincount reads the max id back to the host (no graph capture)
        send_counts = torch.zeros(ep, dtype=torch.int64, device=device).scatter_add_(0, dest, torch.ones_like(dest))
        expert_counts = torch.zeros(self.placement.num_experts, dtype=torch.int64, device=device)
        expert_counts.scatter_add_(0, ids, torch.ones_like(ids))
        weights = topk_weights.reshape(-1).float()
        # metadata rows: local expert, source pair index, weight bits (float32 viewed as int32)
        meta = torch.stack([local[order], order, weights[order].contiguous().view(torch.int32).long()], dim=1)
        rows = x[order // k] if k else x.new_empty((0, h))

        if self.capacity is None:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            splits = torch.stack([send_counts, recv_counts]).cpu().tolist()  # the one host sync
            send_splits, recv_splits = splits
            n_recv = sum(recv_splits)
            recv_x = x.new_empty((n_recv, h))
            dist.all_to_all_single(recv_x, rows.contiguous(), recv_splits, send_splits, group=self.group)
            recv_meta = meta.new_empty((n_recv, 3))
            dist.all_to_all_single(recv_meta, meta.contiguous(), recv_splits, send_splits, group=self.group)
            src_rank = torch.repeat_interleave(
                torch.arange(ep, device=device), torch.tensor(recv_splits, device=device), output_size=n_recv
            )
            slot_of_pair = None
            dropped = torch.zeros((), dtype=torch.int64, device=device)
        else:
            c = self.capacity
            starts = torch.cumsum(send_counts, 0) - send_counts
            pos = torch.arange(order.numel(), device=device) - starts[dest_sorted]
            fits = pos < c
            dump = ep * c  # one scratch row past the buffer takes what does not fit
            slot_sorted = torch.where(fits, dest_sorted * c + pos, torch.full_like(pos, dump))
            send_x = x.new_zeros((dump + 1, h))
            send_x.index_copy_(0, slot_sorted, rows)
            send_meta = meta.new_zeros((dump + 1, 3))
            send_meta[:, 1] = -1
            send_meta.index_copy_(0, slot_sorted, meta)
            recv_x = x.new_empty((dump, h))
            dist.all_to_all_single(recv_x, send_x[:dump].contiguous(), group=self.group)
            recv_meta = meta.new_empty((dump, 3))
            dist.all_to_all_single(recv_meta, send_meta[:dump].contiguous(), group=self.group)
            src_rank = torch.arange(ep, device=device).repeat_interleave(c)
            slot_of_pair = torch.empty_like(slot_sorted)
            slot_of_pair[order] = slot_sorted
            dropped = (~fits).sum()
            send_splits = recv_splits = None

        recv = RecvMeta(
            local_ids=recv_meta[:, 0],
            weights=recv_meta[:, 2].to(torch.int32).view(torch.float32),
            src_rank=src_rank,
            src_slot=recv_meta[:, 1],
        )
        handle = DispatchHandle(
            num_tokens=t,
            top_k=k,
            topk_weights=topk_weights.float(),
            order=order,
            send_splits=send_splits,
            recv_splits=recv_splits,
            slot_of_pair=slot_of_pair,
            capacity=self.capacity,
            expert_counts=expert_counts,
            dropped=dropped,
        )
        return recv_x, recv, handle

    # ------------------------------------------------------------------ combine
    def combine(self, y: torch.Tensor, handle: DispatchHandle, apply_weights: bool = True) -> torch.Tensor:
        """Bring expert outputs home and sum each token's K of them.

        y [R, H]: outputs for the rows ``dispatch`` returned, same order. ``apply_weights``: multiply each by
        its routing weight (False when the experts already did). Returns [T, H] in y.dtype.
        """
        t, k = handle.num_tokens, handle.top_k
        h = y.shape[-1]
        if handle.capacity is None:
            expected = sum(handle.recv_splits)
            if y.shape[0] != expected:
                raise ValueError(f"combine: expected y with {expected} rows (recv_x's), got {list(y.shape)}")
            back = y.new_empty((t * k, h))
            dist.all_to_all_single(back, y.contiguous(), handle.send_splits, handle.recv_splits, group=self.group)
            pairs = torch.empty((t * k, h), dtype=torch.float32, device=y.device)
            pairs[handle.order] = back.float()
        else:
            dump = self.ep_size * handle.capacity
            if y.shape[0] != dump:
                raise ValueError(f"combine: expected y with {dump} rows (recv_x's), got {list(y.shape)}")
            back = y.new_empty((dump + 1, h))
            back[dump].zero_()
            dist.all_to_all_single(back[:dump], y.contiguous(), group=self.group)
            pairs = back[handle.slot_of_pair].float()
        pairs = pairs.view(t, k, h)
        if apply_weights:
            pairs = pairs * handle.topk_weights.unsqueeze(-1)
        return pairs.sum(1).to(y.dtype)
