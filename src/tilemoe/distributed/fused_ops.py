"""Launchers of the ``fused`` path's kernels and the buffers of one rank (shared by the GPU backend and the
one-process simulation). Kernels and buffer meanings: ``fused_kernels``; layout: ``fused_layout``.

One forward on every rank, in stream order (nothing waits on the host):
1. ``fused_layout``: where each of this rank's pairs goes (three small multi-program kernels), and the epoch
   advances.
2. ``dispatch_gemm1``: one launch; its first ``num_put`` programs put rows + metadata into the destinations
   and raise one flag per row-block; the other programs are GEMM 1 tiles that wait for their block's flag
   (own region first, so local rows start at once while remote rows are in flight).
3. ``gemm2_put``: GEMM 2; the epilogue scales by the routing weight and stores each row straight into its
   source's ``ret``, then raises that tile's combine flag there.
4. ``combine``: waits for the combine flags of its rows and sums the K rows of each token.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tilemoe.config import MoEConfig
from tilemoe.distributed.fused_kernels import (
    ERR_COMBINE,
    ERR_DISPATCH,
    _combine_kernel,
    _dispatch_gemm1_kernel,
    _gemm2_put_kernel,
)
from tilemoe.distributed.fused_layout import FusedGeometry, FusedLayout, layout_scratch_size, new_layout_buffers
from tilemoe.ops._launch import launch_fitting
from tilemoe.ops.act_and_mul import ACTIVATION_CODES

SYMMETRIC_BUFFERS = ("recv_x", "recv_meta", "hdr", "bflag", "ret", "cflag", "done")
ERRORS = {
    ERR_DISPATCH: "a GEMM 1 program waited too long for rows from a peer (dispatch)",
    ERR_COMBINE: "a combine program waited too long for expert outputs from a peer (combine)",
}


@dataclass(frozen=True)
class FusedTiles:
    """Tile shapes and program counts. ``FusedDispatcher`` derives them from the tuner (``fused_tiles_for``)
    unless given. Defaults: the H100 tuning table's choice for T*K = 16384 rows at H = 2048 (block_m 128,
    GEMM 1 128 x 64, GEMM 2 256 x 64, 8 warps); num_put 32: the H200 probe moved 92% of the peak put
    bandwidth with ~32 CTAs."""

    block_m: int = 128
    block_n1: int = 128
    block_k1: int = 64
    num_warps1: int = 8
    num_stages1: int = 3
    block_n2: int = 256
    block_k2: int = 64
    num_warps2: int = 8
    num_stages2: int = 3
    num_put: int = 32
    block_h: int = 128  # columns per put step
    block_t: int = 16  # tokens per combine program
    tma: bool = False  # weights and GEMM 2's input via TMA where the layout allows (fused_tiles_for: on, 16-bit)
    # column slices each row-block's put is cut into, each its own put work item and flag (``_put_blocks``);
    # 1 (default): whole blocks. Opt-in until timed on two GPUs (session 4: `--fused-variants put_split=4`)
    put_split: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n1", "block_k1", "block_n2", "block_k2", "block_h", "block_t", "put_split"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"FusedTiles.{name}: expected a power of two, got {value!r}")
        if not isinstance(self.tma, bool):
            raise ValueError(f"FusedTiles.tma: expected a bool, got {self.tma!r}")
        for name in ("num_put", "num_warps1", "num_warps2", "num_stages1", "num_stages2"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FusedTiles.{name}: expected an int >= 1, got {value!r}")


# FusedTiles fields that size the symmetric buffers (block_m: the regions; block_n2: the combine flags;
# put_split: the block flags): tiles that differ only in other fields can run on the same buffers
BUFFER_FIELDS = ("block_m", "block_n2", "put_split")


def parse_tiles_overrides(spec: str, flag: str = "--fused-variants") -> dict[str, int | bool]:
    """``"tma=1,num_put=128"`` -> ``{"tma": True, "num_put": 128}``: FusedTiles fields to replace, each checked
    (``dataclasses.replace`` on the default tiles). Raises ValueError naming ``flag``, the bad item and the
    fields there are."""
    fields = {f.name: f for f in dataclasses.fields(FusedTiles)}
    out: dict[str, int | bool] = {}
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(f"{flag}: expected FIELD=VALUE[,FIELD=VALUE...], got {spec!r}")
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in fields:
            raise ValueError(f"{flag}: {item!r} in {spec!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
        if key in out:
            raise ValueError(f"{flag}: {key!r} given twice in {spec!r}")
        if fields[key].type in (bool, "bool"):
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"{flag}: {key} expects 0/1/true/false, got {value!r} in {spec!r}")
            out[key] = value.lower() in ("1", "true")
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"{flag}: {key} expects an int, got {value!r} in {spec!r}") from None
    try:
        dataclasses.replace(FusedTiles(), **out)
    except ValueError as error:
        raise ValueError(f"{flag}: {spec!r}: {error}") from None
    return out


def overrides_label(overrides: dict[str, int | bool]) -> str:
    """The canonical ``field=value,...`` text of ``parse_tiles_overrides``' result (bools as 0 / 1): the
    benchmark's row names, ``fused[<label>]``."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in overrides.items())


# shared memory one GEMM program may claim for its pipeline stages (bytes): H100 / H200 allow 227 KiB per CTA;
# the rest is left to the epilogue's layout conversions
STAGE_SMEM_BUDGET = 200 * 1024


def fused_tiles_for(config: MoEConfig, max_tokens: int, dtype: torch.dtype, device_name: str | None) -> FusedTiles:
    """Tiles of the fused GEMMs from the single-GPU tuner (``tilemoe.tuning.pick_config``), chosen once at init.

    The shape asked for is the full layer's (E, K, H, I) at ``max_tokens`` tokens: one source's pairs for one
    expert, T*K/E rows, are what each row-block holds (every (source, expert) group is padded to block_m on
    its own), and that is the rows per expert the single-GPU kernel pads at T tokens. Everything is fixed
    at init, not per call: block_m sizes the symmetric buffers, and block_n2 numbers the combine flags,
    which the destination (GEMM 2) and the source (combine) must agree on although their T differ.
    Decode and grouped_mm configs (other kernels) fall back to ``heuristic_config``; a split-tail entry gives
    half-height tiles where the average group fits one (the fused kernels have no split tails); the fused kernels have
    no persistent variant, so the tile shapes, warps and stages are taken, with ``tma`` on for 16-bit dtypes
    (2x H200, bf16, T = 8192 per rank: fused-graph 1.025 -> 0.862 ms at FlashMoE's shape, qwen3-30b-a3b 1.909 ->
    1.673, deepseek-v2-lite 2.091 -> 1.825; docs/expert_parallel.md, session 4), the stages cut to
    what ``STAGE_SMEM_BUDGET`` holds with pointer loads (and cut again at launch if Triton still finds the
    shared memory short, see ``_launch``).
    """
    from tilemoe.tuning import MoEShape, heuristic_config, pick_config

    shape = MoEShape(max(1, max_tokens), config.num_experts, config.top_k, config.hidden_size,
                     config.intermediate_size)  # fmt: skip
    kc = pick_config(shape, dtype, device_name)
    if kc.decode or kc.grouped_mm:
        kc = heuristic_config(shape, dtype)
    block_m = kc.block_m
    if kc.split_tail and max_tokens * config.top_k <= config.num_experts * (kc.block_m // 2):
        # the entry relies on half-height tail tiles, which the fused kernels lack; with at most half a block of rows
        # per (source, expert) group on average, half-height tiles are what that entry mostly ran (H200 qwen3-30b-a3b
        # T=1024: a 128-row split entry since session 5; the 64-row entry before it ran fused EP at 0.474 ms)
        block_m = kc.block_m // 2
    elem = torch.empty((), dtype=dtype).element_size()
    b_tiles = 2 if config.gated else 1

    def stages(wanted: int, stage_bytes: int) -> int:
        return max(1, min(wanted, STAGE_SMEM_BUDGET // stage_bytes))

    s1 = stages(kc.num_stages1, (block_m * kc.block_k1 + b_tiles * kc.block_k1 * kc.block_n1) * elem)
    s2 = stages(kc.num_stages2, (block_m * kc.block_k2 + kc.block_k2 * kc.block_n2) * elem)
    return FusedTiles(
        block_m=block_m, block_n1=kc.block_n1, block_k1=kc.block_k1, num_warps1=kc.num_warps1, num_stages1=s1,
        block_n2=kc.block_n2, block_k2=kc.block_k2, num_warps2=kc.num_warps2, num_stages2=s2,
        tma=dtype in (torch.float16, torch.bfloat16),
    )  # fmt: skip


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# the interpreter runs every program in Python: the smallest tiles tl.dot accepts
INTERPRETER_TILES = FusedTiles(
    block_m=16, block_n1=16, block_k1=16, num_warps1=4, num_stages1=1,
    block_n2=16, block_k2=16, num_warps2=4, num_stages2=1, num_put=2, block_h=32, block_t=8,
)  # fmt: skip


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def buffer_specs(geom: FusedGeometry, tiles: FusedTiles, dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shapes and dtypes of the symmetric buffers, in allocation order (the same on every rank)."""
    ep, maxb, h = geom.ep_size, geom.max_blocks, geom.hidden_size
    nt2 = triton.cdiv(h, tiles.block_n2)
    return {
        "recv_x": ((geom.recv_rows, h), dtype),
        "recv_meta": ((geom.recv_rows, 2), torch.int32),
        "hdr": ((ep,), torch.int64),
        "bflag": ((ep * maxb * tiles.put_split,), torch.int64),
        "ret": ((max(1, geom.max_tokens * geom.top_k), h), dtype),
        "cflag": ((ep * maxb * nt2,), torch.int64),
        "done": ((ep,), torch.int64),
    }


class FusedRank:
    """One rank's buffers: the symmetric ones (given: symmetric memory on GPUs, plain tensors in the
    simulation), the tables of every rank's base address of each, and the local ones."""

    def __init__(
        self,
        rank: int,
        geom: FusedGeometry,
        tiles: FusedTiles,
        symmetric: dict[str, torch.Tensor],
        tables: dict[str, torch.Tensor],
    ) -> None:
        missing = [n for n in SYMMETRIC_BUFFERS if n not in symmetric or n not in tables]
        if missing:
            raise ValueError(f"symmetric / tables: expected buffers {SYMMETRIC_BUFFERS}, missing {missing}")
        self.rank, self.geom, self.tiles = rank, geom, tiles
        self.buf, self.tables = symmetric, tables
        device, dtype = symmetric["recv_x"].device, symmetric["recv_x"].dtype
        self.act = torch.empty((geom.recv_rows, geom.intermediate_size), dtype=dtype, device=device)
        self.nb_local = torch.zeros(geom.ep_size, dtype=torch.int64, device=device)
        self.bexp_local = torch.zeros(geom.ep_size * geom.max_blocks, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)  # advanced by fused_layout per forward
        self.scratch = torch.zeros(layout_scratch_size(geom), dtype=torch.int32, device=device)
        self.layout = new_layout_buffers(geom, device)  # fused_layout's output, reused by every forward
        self.err = torch.zeros(1, dtype=torch.int32, device=device)
        self._descriptors: dict[tuple, object] = {}

    def descriptor(self, tensor: torch.Tensor, block_rows: int, block_cols: int):
        """A TMA descriptor over ``tensor`` [..., C] viewed as [-1, C] with [block_rows, block_cols] boxes, kept
        for the next forward (weights and ``act`` keep their storage), or None where TMA cannot read it."""
        from tilemoe.ops._fused_experts_launch import _tma_descriptor

        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, block_rows, block_cols)
        if key not in self._descriptors:
            if len(self._descriptors) > 16:  # weights swapped many times: do not hold every old storage's key
                self._descriptors.clear()
            self._descriptors[key] = _tma_descriptor(tensor, block_rows, block_cols)
        return self._descriptors[key]

    def error(self) -> str | None:
        """The error a bounded wait recorded (reads the device: a sync), or None."""
        code = int(self.err.item())
        return None if code == 0 else ERRORS.get(code, f"error code {code}")


def _launch(r: FusedRank, kernel, grid: tuple, stages_field: str, **kwargs) -> None:
    """Launch ``kernel`` with ``num_stages`` from ``r.tiles.<stages_field>``, one stage fewer per shared-memory
    refusal (``tilemoe.ops._launch.launch_fitting``), remembering what fit in ``r.tiles``. Stages change no flag or
    buffer, so ranks may end up with different ones."""
    stages = launch_fitting(kernel, grid, r.act.device, **kwargs, num_stages=getattr(r.tiles, stages_field))
    if stages != getattr(r.tiles, stages_field):
        r.tiles = dataclasses.replace(r.tiles, **{stages_field: stages})


def dispatch_gemm1(
    r: FusedRank,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    layout: FusedLayout,
    w13: torch.Tensor,
    b13: torch.Tensor | None,
    config: MoEConfig,
    *,
    put: bool = True,
    gemm: bool = True,
    compute: bool = True,
    max_spin: int = 1,
) -> None:
    """Step 2 (see the module docstring). put / gemm: both on GPUs; one at a time in the simulation.
    compute=False: the GEMM programs only wait for their rows (communication-only timing)."""
    g, t = r.geom, r.tiles
    spin = not interpreting()
    nt1 = triton.cdiv(g.intermediate_size, t.block_n1) if compute else 1
    grid = (t.num_put if put else 0) + (g.ep_size * g.max_blocks * nt1 if gemm else 0)
    x = x.contiguous() if x.shape[0] else r.buf["ret"][:1]  # T = 0: any valid address; never read
    w13_desc = r.descriptor(w13, t.block_n1, t.block_k1) if t.tma and gemm and compute else None
    _launch(
        r, _dispatch_gemm1_kernel, (grid,), "num_stages1",
        x_ptr=x, topk_w_ptr=topk_weights.reshape(-1).float().contiguous(), inv_ptr=layout.inv,
        nblocks_ptr=layout.nblocks, bexp_ptr=layout.block_expert,
        peer_x_ptr=r.tables["recv_x"], peer_meta_ptr=r.tables["recv_meta"], peer_hdr_ptr=r.tables["hdr"],
        peer_bflag_ptr=r.tables["bflag"],
        recv_x_ptr=r.buf["recv_x"], recv_meta_ptr=r.buf["recv_meta"], hdr_ptr=r.buf["hdr"], bflag_ptr=r.buf["bflag"],
        w13_ptr=w13 if w13_desc is None else w13_desc, b13_ptr=b13 if b13 is not None else w13, act_ptr=r.act,
        nb_local_ptr=r.nb_local,
        bexp_local_ptr=r.bexp_local, epoch_ptr=r.epoch, err_ptr=r.err,
        my_rank=r.rank, ep=g.ep_size, top_k=g.top_k, hidden=g.hidden_size, inter=g.intermediate_size,
        maxb=g.max_blocks, max_spin=max_spin, swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit,
        NUM_PUT=t.num_put, PUT_SPLIT=t.put_split, DO_PUT=put, DO_GEMM=gemm,
        ACTIVATION=ACTIVATION_CODES[config.activation], GATED=config.gated, HAS_BIAS=b13 is not None,
        WEIGHTS_ON_INPUT=config.weights_on_input, FP32_PRECISE=x.dtype == torch.float32,
        EVEN_K=g.hidden_size % t.block_k1 == 0, COMPUTE=compute, W_TMA=w13_desc is not None,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n1, BLOCK_K=t.block_k1, BLOCK_H=t.block_h,
        SPIN=spin, SYS=spin, num_warps=t.num_warps1,
    )  # fmt: skip


def gemm2_put(
    r: FusedRank, w2: torch.Tensor, b2: torch.Tensor | None, config: MoEConfig, *, compute: bool = True
) -> None:
    """Step 3 (see the module docstring). compute=False: zeros stored instead (communication-only timing)."""
    g, t = r.geom, r.tiles
    sys_scope = not interpreting()
    grid = g.ep_size * g.max_blocks * triton.cdiv(g.hidden_size, t.block_n2)
    w2_desc = r.descriptor(w2, t.block_n2, t.block_k2) if t.tma and compute else None
    act_desc = r.descriptor(r.act, t.block_m, t.block_k2) if t.tma and compute else None
    _launch(
        r, _gemm2_put_kernel, (grid,), "num_stages2",
        act_ptr=r.act if act_desc is None else act_desc, recv_meta_ptr=r.buf["recv_meta"],
        w2_ptr=w2 if w2_desc is None else w2_desc, b2_ptr=b2 if b2 is not None else w2,
        nb_local_ptr=r.nb_local, bexp_local_ptr=r.bexp_local, epoch_ptr=r.epoch,
        peer_ret_ptr=r.tables["ret"], peer_cflag_ptr=r.tables["cflag"], peer_done_ptr=r.tables["done"],
        my_rank=r.rank, ep=g.ep_size, hidden=g.hidden_size, inter=g.intermediate_size, maxb=g.max_blocks,
        WEIGHTS_ON_INPUT=config.weights_on_input, HAS_BIAS=b2 is not None,
        FP32_PRECISE=r.act.dtype == torch.float32, EVEN_K=g.intermediate_size % t.block_k2 == 0,
        COMPUTE=compute, W_TMA=w2_desc is not None, A_TMA=act_desc is not None,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n2, BLOCK_K=t.block_k2, OUT_DTYPE=_TL_DTYPES[r.act.dtype], SYS=sys_scope,
        num_warps=t.num_warps2,
    )  # fmt: skip


def combine(r: FusedRank, num_tokens: int, layout: FusedLayout, *, max_spin: int = 1) -> torch.Tensor:
    """Step 4: out [num_tokens, H] in the buffers' dtype. Always at least one program: it waits for every
    destination's ``done``, so even a rank with no tokens never reuses its buffers too early."""
    g, t = r.geom, r.tiles
    spin = not interpreting()
    ret = r.buf["ret"]
    out = torch.empty((num_tokens, g.hidden_size), dtype=ret.dtype, device=ret.device)
    pair_block = layout.pair_block if num_tokens else r.nb_local  # T = 0: any valid address; never read
    grid = (max(1, triton.cdiv(num_tokens, t.block_t)), triton.cdiv(g.hidden_size, t.block_n2))
    _combine_kernel[grid](
        ret, pair_block, r.buf["cflag"], r.buf["done"], out if num_tokens else ret, r.epoch, r.err,
        num_tokens, g.ep_size, g.hidden_size, max_spin,
        K=g.top_k, EP_P2=max(2, triton.next_power_of_2(g.ep_size)), BLOCK_T=t.block_t, BLOCK_N=t.block_n2,
        SPIN=spin, SYS=spin, num_warps=4,
    )  # fmt: skip
    return out
