"""The ``fused`` expert-parallel data path simulated: every rank in one process, the same kernels, phases in order.

On GPUs (``fused_backend``) each rank runs layout -> dispatch+GEMM 1 -> GEMM 2 -> combine on its own stream and
the kernels overlap across ranks through the flags (``fused_ops`` tells the steps). Here the ranks' "symmetric"
buffers are plain tensors of this process, reached through the same address tables, and each phase runs on
every rank before the next one starts (the interpreter cannot spin): 1. every rank's dispatch puts, 2. every
rank's GEMM 1 (each program checks its flags instead of waiting: a missing flag is recorded as an error),
3. every rank's GEMM 2 with its remote-store epilogue, 4. every rank's combine (checking its flags).
Receive rows, return rows and GEMM 1 outputs start as NaN, so a row the kernels fail to write shows up.
"""

from __future__ import annotations

import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed.fused_layout import FusedGeometry, fused_layout
from tilemoe.distributed.fused_ops import (
    INTERPRETER_TILES,
    FusedRank,
    FusedTiles,
    buffer_specs,
    combine,
    dispatch_gemm1,
    gemm2_put,
)
from tilemoe.distributed.placement import ExpertPlacement


def _table(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)


class SimulatedFusedEP:
    """All ranks of the fused path in one process, buffers kept across forwards (epochs grow, nothing reset).

    Args:
        placement: which rank owns which expert (its ep_size is the number of simulated ranks).
        config: the full layer's MoEConfig; max_tokens: the most tokens any rank sends in one forward.
        dtype / device: of activations, weights and buffers. tiles: default ``INTERPRETER_TILES``.
    """

    def __init__(
        self,
        placement: ExpertPlacement,
        config: MoEConfig,
        *,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tiles: FusedTiles = INTERPRETER_TILES,
    ) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
        self.placement, self.config, self.tiles = placement, config, tiles
        self.geom = FusedGeometry.of(
            placement, max_tokens=max_tokens, top_k=config.top_k, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, block_m=tiles.block_m,
        )  # fmt: skip
        ep = placement.ep_size
        specs = buffer_specs(self.geom, tiles, dtype)
        bufs = [{name: _poisoned(shape, dt, device) for name, (shape, dt) in specs.items()} for _ in range(ep)]
        tables = {name: _table([b[name] for b in bufs]) for name in specs}
        self.ranks = [FusedRank(r, self.geom, tiles, bufs[r], tables) for r in range(ep)]
        for r in self.ranks:
            r.act.fill_(float("nan"))
        self.owner = placement.owner_tensor(device)
        self.local_index = placement.local_index_tensor(device)

    def forward(
        self,
        xs: list[torch.Tensor],
        topk_weights: list[torch.Tensor],
        topk_ids: list[torch.Tensor],
        w13: list[torch.Tensor],
        w2: list[torch.Tensor],
        *,
        b13: list[torch.Tensor] | None = None,
        b2: list[torch.Tensor] | None = None,
        skip_puts_of: int | None = None,
    ) -> list[torch.Tensor]:
        """Outputs [T_r, H] of every rank r; xs / topk_* per rank; w13 / w2 (b13 / b2) per rank: its experts.

        skip_puts_of: a rank whose dispatch puts are left out (a lost peer), to test the flag checks.
        Raises ValueError when a rank has more than max_tokens tokens, or when a rank's kernels found a flag
        not raised (naming the rank and the phase).
        """
        ep = len(self.ranks)
        if not len(xs) == len(topk_ids) == len(topk_weights) == len(w13) == len(w2) == ep:
            raise ValueError(f"xs, topk_*, w13, w2: expected one per rank ({ep}), got {len(xs)}")
        for r, x in enumerate(xs):
            if x.shape[0] > self.geom.max_tokens:
                raise ValueError(f"xs[{r}]: {x.shape[0]} tokens exceed max_tokens={self.geom.max_tokens}")
        layouts = [
            fused_layout(topk_ids[r.rank], self.owner, self.local_index, self.geom, r.scratch, r.epoch, r.layout)
            for r in self.ranks
        ]
        for r in self.ranks:  # 1. dispatch puts
            if r.rank != skip_puts_of:
                dispatch_gemm1(r, xs[r.rank], topk_weights[r.rank], layouts[r.rank], w13[r.rank],
                               b13[r.rank] if b13 else None, self.config, put=True, gemm=False)  # fmt: skip
        for r in self.ranks:  # 2. GEMM 1, flags checked
            dispatch_gemm1(r, xs[r.rank], topk_weights[r.rank], layouts[r.rank], w13[r.rank],
                           b13[r.rank] if b13 else None, self.config, put=False, gemm=True)  # fmt: skip
        self._check("GEMM 1 (dispatch flags)")
        for r in self.ranks:  # 3. GEMM 2, stores into the sources
            gemm2_put(r, w2[r.rank], b2[r.rank] if b2 else None, self.config)
        outs = [combine(r, xs[r.rank].shape[0], layouts[r.rank]) for r in self.ranks]  # 4.
        self._check("combine (combine flags)")
        return outs

    def _check(self, phase: str) -> None:
        for r in self.ranks:
            message = r.error()
            if message is not None:
                raise ValueError(f"{phase}: rank {r.rank}: {message}")


def _poisoned(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def simulate_fused_forward(
    xs: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    w13: list[torch.Tensor],
    w2: list[torch.Tensor],
    placement: ExpertPlacement,
    config: MoEConfig,
    *,
    max_tokens: int | None = None,
    tiles: FusedTiles = INTERPRETER_TILES,
) -> list[torch.Tensor]:
    """One forward of a fresh ``SimulatedFusedEP`` (max_tokens default: the largest T): outputs [T_r, H]."""
    sim = SimulatedFusedEP(
        placement, config, max_tokens=max_tokens or max(1, max(x.shape[0] for x in xs)),
        dtype=xs[0].dtype, device=xs[0].device, tiles=tiles,
    )  # fmt: skip
    return sim.forward(xs, topk_weights, topk_ids, w13, w2)
