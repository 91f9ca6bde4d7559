"""The ``fused`` expert-parallel data path, simulated: every rank in one process, phases in order.

Steps (the same on the GPU, where they would overlap and consumers would spin on the flags):
1. Each source sorts its (token, slot) pairs by destination (as ``epmoe`` does) and the dispatch-put kernel
   stores every row, its metadata and the per-source count straight into the destination's receive buffers,
   raising one flag per tile with this forward's epoch.
2. Each destination runs its local experts on the rows that arrived (weights applied there).
3. The combine-put kernel stores each output row straight into the source's ``ret`` buffer at the pair's
   own index (t*K + k), raising flags.
4. Each source sums its K rows per token.
Here the "peer buffers" are plain tensors of this process, reached through the same address tables, and a
phase starts only after the previous one finished on every rank (the interpreter cannot spin-wait); the flags
are checked instead of waited on. What is missing for real GPUs is listed in fused_kernels' docstring.
"""

from __future__ import annotations

import os

import torch
import triton

from tilemoe.config import MoEConfig
from tilemoe.distributed.fused_kernels import _combine_put_kernel, _dispatch_put_kernel
from tilemoe.distributed.placement import ExpertPlacement
from tilemoe.functional import experts_forward


def _table(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)


def simulate_fused_forward(
    xs: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    w13: list[torch.Tensor],
    w2: list[torch.Tensor],
    placement: ExpertPlacement,
    config: MoEConfig,
    *,
    capacity: int | None = None,
    local_impl: str = "grouped",
    epoch: int = 1,
    block_m: int = 16,
    block_h: int = 32,
) -> list[torch.Tensor]:
    """Outputs [T_r, H] of every simulated rank r. xs / topk_* per rank; w13 / w2 per rank: its local experts.

    capacity: rows per (source, destination) pair (default max_r T_r * K: dropless).
    Raises ValueError when a rank's pairs for one destination exceed ``capacity``, or a flag was not raised.
    """
    ep = placement.ep_size
    if not len(xs) == len(topk_ids) == len(topk_weights) == len(w13) == len(w2) == ep:
        raise ValueError(f"xs, topk_*, w13, w2: expected one per rank ({ep}), got {len(xs)}")
    k, h = config.top_k, config.hidden_size
    device, dtype = xs[0].device, xs[0].dtype
    c = capacity or max(1, max(x.shape[0] for x in xs) * k)
    tiles = triton.cdiv(c, block_m)
    owner, local_index = placement.owner_tensor(device), placement.local_index_tensor(device)
    system_scope = os.environ.get("TRITON_INTERPRET") != "1"

    recv_x = [torch.full((ep * c, h), float("nan"), dtype=dtype, device=device) for _ in range(ep)]
    recv_meta = [torch.zeros((ep * c, 3), dtype=torch.int64, device=device) for _ in range(ep)]
    recv_cnt = [torch.full((ep,), -1, dtype=torch.int64, device=device) for _ in range(ep)]
    ret = [torch.full((x.shape[0] * k, h), float("nan"), dtype=dtype, device=device) for x in xs]
    disp_flags = [torch.zeros(ep * tiles, dtype=torch.int64, device=device) for _ in range(ep)]
    comb_flags = [torch.zeros(ep * tiles, dtype=torch.int64, device=device) for _ in range(ep)]

    # 1. dispatch-put from every source
    for s in range(ep):
        ids = topk_ids[s].reshape(-1).long()
        dest = owner[ids]
        order = torch.sort(dest * max(1, placement.max_local) + local_index[ids], stable=True)[1]
        counts = torch.zeros(ep, dtype=torch.int64, device=device).scatter_add_(0, dest, torch.ones_like(dest))
        if int(counts.max()) > c:
            raise ValueError(f"capacity: rank {s} sends {int(counts.max())} rows to one rank, more than {c}")
        starts = torch.cumsum(counts, 0) - counts
        bits = topk_weights[s].reshape(-1).float()[order].contiguous().view(torch.int32).long()
        meta = torch.stack([local_index[ids][order], order, bits], dim=1).contiguous()
        _dispatch_put_kernel[(ep, tiles)](
            xs[s].contiguous(), order.contiguous(), meta, starts, counts,
            _table(recv_x), _table(recv_meta), _table(recv_cnt), _table(disp_flags),
            s, epoch, h, c,
            K=k, TILES=tiles, BLOCK_M=block_m, BLOCK_H=block_h, SYSTEM_SCOPE=system_scope,
        )  # fmt: skip
    # 2. local experts on what arrived (a GPU consumer would wait on flag >= epoch tile by tile)
    ys = []
    for d in range(ep):
        cnt = recv_cnt[d]
        _check_flags(disp_flags[d], cnt, tiles, block_m, epoch, f"dispatch into rank {d}")
        rows = torch.cat([torch.arange(s * c, s * c + int(cnt[s]), device=device) for s in range(ep)])
        y = torch.full((ep * c, h), float("nan"), dtype=dtype, device=device)
        if rows.numel() and w13[d].shape[0]:
            meta = recv_meta[d][rows]
            weights = meta[:, 2].to(torch.int32).view(torch.float32).unsqueeze(1)
            local_cfg = config.replace(num_experts=w13[d].shape[0], top_k=1)
            y[rows] = experts_forward(
                recv_x[d][rows], w13[d], w2[d], weights, meta[:, :1], config=local_cfg, impl=local_impl
            )
        ys.append(y)
    # 3. combine-put back to every source
    for d in range(ep):
        _combine_put_kernel[(ep, tiles)](
            ys[d], recv_meta[d], recv_cnt[d], _table(ret), _table(comb_flags),
            d, epoch, h, c,
            TILES=tiles, BLOCK_M=block_m, BLOCK_H=block_h, SYSTEM_SCOPE=system_scope,
        )  # fmt: skip
    # 4. each source: K rows per token, weights already applied by the experts
    outs = []
    for s in range(ep):
        sent = torch.tensor([int(recv_cnt[d][s]) for d in range(ep)], device=device)
        _check_flags(comb_flags[s], sent, tiles, block_m, epoch, f"combine into rank {s}")
        outs.append(ret[s].float().view(xs[s].shape[0], k, h).sum(1).to(dtype))
    return outs


def _check_flags(flags, counts, tiles, block_m, epoch, what) -> None:
    for src in range(counts.numel()):
        needed = max(1, triton.cdiv(int(counts[src]), block_m))
        got = flags[src * tiles : src * tiles + needed]
        if not bool((got == epoch).all()):
            raise ValueError(f"{what}: flags from rank {src} are {got.tolist()}, expected all {epoch}")
