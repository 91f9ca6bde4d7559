"""Kernel configs of the fused Triton MoE: ``pick_config`` (pure; tuned table, else a heuristic) and tables.

A table is a JSON file in ``tilemoe/tuning_tables`` named after the device (``torch.cuda.get_device_name``,
lower case, non-alphanumerics as '_'), mapping a shape key to a KernelConfig dict::

    {"device": "NVIDIA H100 80GB HBM3", "configs": {"E128_K8_H2048_I768_bf16_T64": {...}, ...}}

Shape key: E, K, H, I, dtype and the token bucket (the power of two at or above T, 1..16384; larger T share
the 16384 bucket). ``tilemoe tune`` (``tilemoe.tune_cli``) writes these tables; it tunes T = 1, 8, 64, ..., 16384 by
default, so a T between those (prefill chunks of 2048 or 8192 tokens, say) finds no entry of its own bucket and takes
the entry tuned nearest to it (``table_entry``) before the heuristic; an fp16 layer takes the bf16 entries (the
shipped tables are tuned in bf16).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "KernelConfig",
    "MoEShape",
    "config_source",
    "pick_config",
    "heuristic_config",
    "prefers_grouped_mm",
    "same_model_table_path",
    "shape_key",
    "table_entry",
    "table_entry_key",
    "table_path",
    "token_bucket",
]

TABLE_DIR = Path(__file__).parent / "tuning_tables"
MAX_BUCKET = 16384
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes of the two expert GEMMs. ``block_m`` is also the alignment of each expert's rows.

    GEMM 1 tiles its I gate columns (and the matching up columns) by ``block_n1``, H by ``block_k1``;
    GEMM 2 tiles H by ``block_n2``, I by ``block_k2``. All block sizes are powers of two >= 16.
    ``tma``: weight tiles through TMA tensor descriptors (Hopper+; the launcher falls back to pointer loads
    where the layout does not allow it; GEMM 2 then reads GEMM 1's output through one too). ``persistent``: GEMM 2
    as one program per SM walking the tiles in a flattened loop (GEMM 1 always runs one program per tile).
    ``decode``: the decode kernels (``ops/_kernels/_decode.py``: one row per slot, no alignment or padding, the
    sum over K inside GEMM 2) with ``block_n*`` / ``block_k*`` / ``num_warps*`` as their tiles; ``block_m`` and the
    stage and group fields are then unused. ``grouped_mm``: the two expert GEMMs through torch's grouped GEMM
    (cuBLAS / CUTLASS), alignment, activation and combine in Triton; only ``block_m`` (the row alignment) is used.
    ``split_tail``: an expert's last block holding at most block_m / 2 real rows runs block_m / 2-row tiles in both
    GEMMs (a persistent GEMM only with ``persistent_tails``), so random routings, which leave about half the experts
    such a tail, pay for fewer padding rows; needs block_m >= 32.
    GEMM 1's input and loop: ``sorted_x`` (needs ``tma``): x copied once into padded sorted order (one more launch
    writing the padded rows x H), read through TMA boxes instead of gathered by token; ``gate_up_dot`` (needs ``tma``):
    one dot per k step over a [2, block_n1, block_k1] box of the gate and up rows (a [block_m, 2 block_n1]
    accumulator) instead of two dots (gated experts only); the launcher falls back to the plain form where TMA cannot
    read the tensor. ``persistent1``: GEMM 1 as one program per SM walking its tiles in a loop flattened with the k
    loop (its split tails are then off, as GEMM 2's are under ``persistent``, unless ``persistent_tails``). A dense
    TMA GEMM ran 17-31% faster in that loop on an H100, a gathered input or two accumulators lost the gain
    (bench/NOTES.md, version 4): the three together give GEMM 1 the dense form.
    ``one_launch``: both GEMMs in one persistent launch (``ops/_kernels/_one_launch.py``), GEMM 2 tiles waiting on
    per-block ready words instead of a kernel boundary; needs num_warps1 == num_warps2, runs num_stages1 for both
    (one kernel), not with ``persistent`` / ``persistent1`` (its own loop); GEMM 2 then reads act by pointers.
    ``persistent_tails`` (needs ``split_tail`` and ``persistent`` or ``persistent1``): the persistent loops keep the
    split tails, each tile picking its height, so those loops are not flattened with the k loop (the next tile's
    loads no longer overlap this tile's epilogue). Why: with full tiles only, a random routing's padding costs the
    persistent GEMMs 11-20% of their rows at qwen3 T=4096, gpt-oss T=16384 and mixtral T=1024 (bench/NOTES.md,
    version 10); measured on an H100, they lost 1-15% wherever they apply (version 12).
    ``gemm1_clears_out`` (the two-launch tiled GEMMs only): the atomic combine's output [T, H] is cleared by GEMM 1's
    programs, a share each before their tiles, instead of by a fill kernel of its own between the GEMMs: one launch
    fewer, the stores draining under GEMM 1's loads (the fill took 2.3 us at qwen3 T=1024 and 29 us at gpt-oss
    T=16384 on an H100, plus a kernel boundary; version 13). The qwen3-30b-a3b / deepseek-v2-lite T=1024 entries take
    it: 0.996x / 0.997x in turn (session 19).
    ``gluon`` (needs ``tma``): the two tiled GEMMs as the Gluon kernels (``ops/_kernels/_gluon_experts.py``: explicit
    TMA rings and async wgmma) on GEMM 1's dense form (x in padded sorted order, as ``sorted_x``) and GEMM 2 reading
    act through TMA; ``block_*``, ``group_m*``, ``num_warps*`` and ``num_stages*`` are their tiles, ``persistent1``
    / ``persistent`` their grids (one program per SM walking tiles, the next tile's boxes loading under this tile's
    epilogue; else one program per tile), ``gate_up_dot`` one wgmma of N = 2 block_n1 over the gate and up boxes
    (else two accumulators); ``split_tail`` unused; block_m >= 64 (a warpgroup MMA's rows). The launcher runs the
    Triton kernels instead where Gluon cannot: fp32, a GPU other than Hopper, TMA unable to read a tensor, the
    interpreter. Measured on an H100 (bench/NOTES.md, version 15, after a ptxas-serialized mainloop was fixed): GEMM 1
    3-7% faster than the Triton kernel at qwen3 / mixtral T = 1024-4096, GEMM 2 -1% to +9%; with ``expert_groups``
    20 H100 entries take them (mixtral, llama4-scout, gpt-oss, qwen2-57b, kimi-k2 and others at T >= 1024).
    ``expert_groups`` (the tiled GEMMs, Triton and Gluon, one launch included): the tiles run expert by expert,
    ``group_m*`` blocks of one expert at a time, instead of in groups of ``group_m*`` blocks over all the blocks. Those
    groups straddle experts, and an expert whose blocks a group edge cuts streams its weights from HBM once per group:
    ncu counted 4.46 GB read by mixtral-8x7b T=4096's GEMM 1 for 1.88 GB of w13 (bench/NOTES.md, version 15). A
    ``group_m*`` at least an expert's blocks then reads its weights once.
    ``gluon2`` (needs ``tma``, not with ``gluon``, which has it): GEMM 2 alone as the Gluon kernel, after the Triton
    GEMM 1; ``gluon1`` (likewise): GEMM 1 alone as the Gluon kernel, before the Triton GEMM 2 (whose fields then
    apply as without Gluon). Each Gluon GEMM won at some shapes and lost at others (bench/NOTES.md, version 16).
    ``pingpong1`` / ``pingpong2`` (a Gluon GEMM 1 / 2 with its persistent grid, num_warps 8): the MMA warps split into
    two warpgroups of 4 that take the program's tiles in turn, one running its epilogue (GEMM 2's: the combine's
    atomics) while the other's wgmmas run (CUTLASS's "ping-pong" schedule); each warpgroup holds one
    [block_m, block_n] tile (so at most 128 x 128 fp32 accumulators, or 128 x 64 for a gated GEMM 1's two).
    Else the 8 warps share one tile (one accumulator of twice the size) and the tensor cores idle through each
    epilogue.
    ``gluon_gather`` (with ``gluon``): the Gluon GEMM 1 reads x's rows by token, copied by a producer warpgroup with
    cp.async (16 bytes a thread), instead of a sorted copy of x through TMA: the copy writes and reads back T*K rows
    of H (134 MB at qwen3-30b-a3b T=4096), more than the Gluon GEMM 1 gained there.
    ``async_combine`` (a Gluon GEMM 2 with its persistent grid, not ping-pong): the combine (GEMM 2's atomic adds, or
    per-slot stores) runs in two warps of its own: the MMA warps leave each weighted tile in a shared-memory stage of
    block_m x block_n2 (which takes room from the ring's stages) and go on to the next tile, whose wgmmas then run
    under the previous tile's atomics, with the full [block_m, block_n2] tile the ping-pong form halves. Measured on
    an H100 (bench/NOTES.md, version 17): the cooperative GEMM 2 7-12% faster with it at qwen3-30b-a3b T = 4096 /
    16384, still slower than ping-pong where that was the entry; after the Triton GEMM 1 it won the T=16384 entries
    of qwen3-30b-a3b, deepseek-v2-lite and mixtral-8x7b (0.96-0.99x).
    ``fold_tails`` (the Triton GEMMs; needs block_m >= 32): an expert's last block holding at most block_m / 2 real
    rows, after another block of the same expert, is computed by that block's tile as block_m / 2 more rows on the
    same weight boxes (a second dot per k step), and its own tile does nothing: the tail no longer streams the
    expert's weights again. A persistent GEMM then runs its loop unflattened (as under ``persistent_tails``). Why:
    balanced routing, which has no padding, ran the issue-4 points' kernels 9-12% faster than random routing on an
    H100 (bench/NOTES.md, version 18). Measured on an H100 (version 19): 1.8-3.8% faster than the same non-persistent
    Triton GEMMs without it at qwen3-30b-a3b / deepseek-v2-lite T=4096 and mixtral-8x7b T=1024, but 1.4-2.2x slower
    under a persistent loop, and slower than the table's entries there. The H100 table's gpt-oss-120b T=4096 entry
    (non-persistent Triton GEMMs) takes it: 0.983x / 0.986x of that entry's time in ``tilemoe tune`` (session 18).
    ``fold_gemm2`` (with ``fold_tails``; True by default): the Triton GEMM 2 folds its tails too; False folds GEMM 1's
    only (GEMM 2 then runs a folded block's rows in that block's own tile, a half tile under split_tail, as it would
    without the fold). Why: at gpt-oss-120b T=4096 on an H100 the fold took GEMM 1 from 1731 to 1655 us but GEMM 2
    from 901 to 920 (kernel probe, random routing, in turn; session 18). That entry takes it: 0.995x in turn in
    ``tilemoe tune`` (session 19).
    ``swap_tails1`` (the Triton GEMM 1, x gathered by token; needs block_m >= 64): a block holding at most block_m / 4
    real rows (an expert's tail) is computed with the operands' roles swapped, acc^T = W @ x^T, the weight box as the
    MMA's M and the block_m / 4 tokens as its N, so its MMAs scale with the tail's rows rather than the tile's height (a
    tail block under split_tail still runs m64 wgmmas on its half). A persistent GEMM 1 swaps only with
    persistent_tails, as it splits (a flattened loop holds one tile shape). Why: Nsight Compute on an H100 found GEMM
    1's one-row tail tiles bound by their MMAs on the padded rows, not by memory (tensor pipe 62 -> 71%, DRAM bytes +2%;
    bench/NOTES.md, version 20). Measured on an H100 (``tilemoe tune``, in turn; session 19): 1.131x of the
    mixtral-8x7b T=1024 entry against 1.017x for the same Triton GEMM 1 without it, even at qwen3-30b-a3b /
    deepseek-v2-lite T=1024 (1.000x / 1.002x), 0.997x / 0.998x at mixtral-8x7b T = 64 / 256, whose entries take it.
    ``col_group2`` (GEMM 2's persistent Triton loop or the Gluon GEMM 2; 0, the default, is off): GEMM 2 runs its tiles
    col_group2 column blocks (of block_n2) at a time, every row block's tiles of those columns before the next ones
    (GROUP_M and expert_groups order them inside), so the combine's atomic adds land in a T x col_group2 * block_n2
    slice of the output that L2 can hold, at the cost of reading act once per group instead of once. Why: at
    qwen3-30b-a3b T=16384 (output 64 MiB, over the L2) Nsight Compute on an H100 counted GEMM 2's DRAM traffic at 1.07
    GB read and 0.44 GB written against ~0.67 GB of weights, act and one output write: the adds' sectors miss L2
    (bench/NOTES.md, version 25). Measured there (session 23, Nsight Compute): 2 column blocks of 256 a group cut the
    writes only to 316 MB (the act and weight streams still evict the slice) while act's re-reads took the reads to 1.57
    GB, 750 -> 824 us; 4 a group 767 us. In ``tilemoe tune`` (random + imbalanced, in turn) it lost at qwen3-30b-a3b,
    deepseek-v2-lite and gpt-oss-120b T=16384 (1.006-1.24x); at mixtral-8x7b T=16384 6 a group screened 0.963x and ran
    0.962x in turn, but the bench (relative to torch_grouped_mm in the same run) and the kernel probe did not confirm
    it. No table entry takes it. Elsewhere (a Triton GEMM 2 without its persistent loop) it does not apply.
    ``align_clears_out`` (the two-launch tiled GEMMs, Triton or Gluon; not with gemm1_clears_out): the atomic combine's
    output [T, H] is cleared by the align's scatter programs (``moe_align``'s ``zeros``), which are latency-bound with
    HBM mostly idle, instead of by a fill kernel between the GEMMs; for the Gluon GEMM 1, which cannot take
    gemm1_clears_out, too. Why: that fill took 6.1 us at qwen3-30b-a3b T=4096, 21.1 at T=16384, 29.3 at gpt-oss-120b
    T=16384 and 45.5 at mixtral-8x7b T=16384 on an H100, at HBM's write rate (bench/NOTES.md, version 25).
    ``tilemoe tune`` took it at 9 of the 12 T = 1024-16384 points of the four bench models (session 24). With the
    sorted scatter (~7-15 us) it was timed again in turn (session 26, ``bench/results/session26-run26.md``): off
    against on 0.996-1.002x at those entries but mixtral-8x7b T=16384 (a 134 MB output), where it saves 2.6%.
    ``per_slot_combine`` (the tiled GEMMs): GEMM 2 stores each slot's row and a second kernel sums a token's K rows, as
    ``deterministic=True`` asks, even where the atomic combine is allowed. Why: at mixtral-8x7b T=16384 on an H100
    ``triton_deterministic`` ran 0.981x / 0.978x of ``triton``'s time in run 24 and 0.984x / 0.986x (with col_group2=6)
    on another H100 in session 23 (random / imbalanced, the full layer in ``tilemoe bench``; why the atomics cost more
    there than the [T*K, H] round trip is not measured); at every other T >= 1024 point of run 24 the atomic combine won
    or tied (0.999-1.117x). The H100 table's mixtral-8x7b T=16384 entry takes it.
    """

    block_m: int = 64
    block_n1: int = 64
    block_k1: int = 64
    group_m1: int = 8
    num_warps1: int = 4
    num_stages1: int = 3
    block_n2: int = 64
    block_k2: int = 64
    group_m2: int = 8
    num_warps2: int = 4
    num_stages2: int = 3
    tma: bool = False
    persistent: bool = False
    decode: bool = False
    grouped_mm: bool = False
    split_tail: bool = False
    sorted_x: bool = False
    gate_up_dot: bool = False
    persistent1: bool = False
    one_launch: bool = False
    persistent_tails: bool = False
    gemm1_clears_out: bool = False
    gluon: bool = False
    expert_groups: bool = False
    gluon2: bool = False
    gluon1: bool = False
    pingpong1: bool = False
    pingpong2: bool = False
    gluon_gather: bool = False
    async_combine: bool = False
    fold_tails: bool = False
    fold_gemm2: bool = True
    swap_tails1: bool = False
    col_group2: int = 0
    align_clears_out: bool = False
    per_slot_combine: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n1", "block_k1", "block_n2", "block_k2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}: expected a power of two >= 16, got {value!r}")
        for name in ("group_m1", "group_m2", "num_warps1", "num_warps2", "num_stages1", "num_stages2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelConfig.{name}: expected a positive int, got {value!r}")
        flags = [f.name for f in dataclasses.fields(self) if f.type == "bool"]  # (annotations are strings here)
        for name in flags:
            value = getattr(self, name)
            if value not in (True, False):  # 0 / 1 from a table or the custom op's int list
                raise ValueError(f"KernelConfig.{name}: expected a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.split_tail and self.block_m < 32:  # a half tile under 16 rows is below tl.dot's minimum
            raise ValueError(f"KernelConfig.split_tail: expected block_m >= 32, got block_m={self.block_m}")
        if self.persistent_tails and not (self.split_tail and (self.persistent or self.persistent1)):
            raise ValueError(
                "KernelConfig.persistent_tails: needs split_tail and persistent or persistent1, got "
                f"split_tail={self.split_tail}, persistent={self.persistent}, persistent1={self.persistent1}"
            )
        for name in ("sorted_x", "gate_up_dot", "gluon", "gluon2", "gluon1"):
            if getattr(self, name) and not self.tma:
                raise ValueError(f"KernelConfig.{name}: needs tma=True (GEMM 1's TMA form), got tma=False")
        if self.one_launch:
            if self.num_warps1 != self.num_warps2:
                raise ValueError(
                    f"KernelConfig.one_launch: needs num_warps1 == num_warps2 (one kernel), got {self.num_warps1} "
                    f"and {self.num_warps2}"
                )
            if self.persistent or self.persistent1:
                raise ValueError("KernelConfig.one_launch: not with persistent or persistent1 (it has its own loop)")
        if self.expert_groups and (self.decode or self.grouped_mm):
            raise ValueError(
                "KernelConfig.expert_groups: only with the tiled GEMMs (their tile order), got "
                f"decode={self.decode}, grouped_mm={self.grouped_mm}"
            )
        if self.align_clears_out and (self.gemm1_clears_out or self.decode or self.grouped_mm or self.one_launch):
            raise ValueError(
                "KernelConfig.align_clears_out: the two-launch tiled GEMMs' output cleared by the align, not with "
                f"gemm1_clears_out (one of them clears it), decode, grouped_mm or one_launch, got gemm1_clears_out="
                f"{self.gemm1_clears_out}, decode={self.decode}, grouped_mm={self.grouped_mm}, "
                f"one_launch={self.one_launch}"
            )
        if self.per_slot_combine and (self.decode or self.grouped_mm):
            raise ValueError(
                "KernelConfig.per_slot_combine: the tiled GEMMs' combine (decode has its own, grouped_mm sums slots "
                f"always), got decode={self.decode}, grouped_mm={self.grouped_mm}"
            )
        if self.gemm1_clears_out and (self.decode or self.grouped_mm or self.one_launch):
            raise ValueError(
                "KernelConfig.gemm1_clears_out: only with the two-launch tiled GEMMs, got "
                f"decode={self.decode}, grouped_mm={self.grouped_mm}, one_launch={self.one_launch}"
            )

        if self.gluon1 and (self.gluon or self.gluon2) or self.gluon2 and self.gluon:
            name = "gluon1" if self.gluon1 else "gluon2"
            raise ValueError(
                f"KernelConfig.{name}: GEMM {name[-1]} alone in Gluon, not with gluon (both GEMMs) nor with the other "
                f"GEMM alone (say gluon), got gluon={self.gluon}, gluon1={self.gluon1}, gluon2={self.gluon2}"
            )
        for name, gemms in (("gluon", (1, 2)), ("gluon1", (1,)), ("gluon2", (2,))):  # the Gluon GEMMs' own limits
            if not getattr(self, name):
                continue
            if self.block_m < 64 or self.one_launch or (1 in gemms and self.gemm1_clears_out):
                raise ValueError(
                    f"KernelConfig.{name}: expected block_m >= 64 (a warpgroup MMA), not with one_launch or "
                    f"gemm1_clears_out (the Triton kernels' forms), got block_m={self.block_m}, "
                    f"one_launch={self.one_launch}, gemm1_clears_out={self.gemm1_clears_out}"
                )
            for gemm in gemms:
                warps, stages = getattr(self, f"num_warps{gemm}"), getattr(self, f"num_stages{gemm}")
                if warps not in (4, 8):
                    raise ValueError(f"KernelConfig.{name}: expected num_warps{gemm} 4 or 8, got {warps}")
                if stages < 2:
                    raise ValueError(f"KernelConfig.{name}: expected num_stages{gemm} >= 2 (a ring), got {stages}")
        mma_warps1 = self.num_warps1 // 2 if self.pingpong1 else self.num_warps1
        if self.gluon_gemm1 and self.gate_up_dot and self.block_m < 16 * mma_warps1:
            raise ValueError(
                "KernelConfig.gate_up_dot: the Gluon GEMM 1 splits its [gate | up] accumulator in registers, which "
                "needs its MMA warps stacked along the rows (block_m >= 16 x the warps on a tile), got "
                f"block_m={self.block_m} with {mma_warps1} warps"
            )
        if self.gluon_gather and not self.gluon_gemm1:
            raise ValueError("KernelConfig.gluon_gather: needs the Gluon GEMM 1 (gluon or gluon1), got neither")
        for name, gluon, persistent, warps in (
            ("pingpong1", self.gluon_gemm1, "persistent1", "num_warps1"),
            ("pingpong2", self.gluon_gemm2, "persistent", "num_warps2"),
        ):
            if getattr(self, name) and not (gluon and getattr(self, persistent) and getattr(self, warps) == 8):
                raise ValueError(
                    f"KernelConfig.{name}: needs that GEMM in Gluon, {persistent}=True and {warps}=8 (two warpgroups),"
                    f" got gluon={self.gluon}, gluon2={self.gluon2}, {persistent}={getattr(self, persistent)}, "
                    f"{warps}={getattr(self, warps)}"
                )
        if self.fold_tails and (self.block_m < 32 or self.gluon or self.one_launch or self.decode or self.grouped_mm):
            raise ValueError(
                "KernelConfig.fold_tails: the Triton GEMMs' tails folded into block_m / 2 more rows, so block_m >= 32 "
                "and a Triton GEMM (not gluon, which takes both, nor one_launch, decode or grouped_mm), got "
                f"block_m={self.block_m}, gluon={self.gluon}, one_launch={self.one_launch}, decode={self.decode}, "
                f"grouped_mm={self.grouped_mm}"
            )
        if self.swap_tails1 and (
            self.block_m < 64 or self.gluon_gemm1 or self.sorted_x or self.one_launch or self.decode or self.grouped_mm
        ):
            raise ValueError(
                "KernelConfig.swap_tails1: the Triton GEMM 1's tails of at most block_m / 4 rows as the MMA's N "
                "(>= 16), x gathered by token, so block_m >= 64 and neither gluon / gluon1, sorted_x, one_launch, "
                f"decode nor grouped_mm, got block_m={self.block_m}, gluon={self.gluon}, gluon1={self.gluon1}, "
                f"sorted_x={self.sorted_x}, one_launch={self.one_launch}, decode={self.decode}, "
                f"grouped_mm={self.grouped_mm}"
            )
        if not isinstance(self.col_group2, int) or isinstance(self.col_group2, bool) or self.col_group2 < 0:
            raise ValueError(f"KernelConfig.col_group2: expected an int >= 0 (0: off), got {self.col_group2!r}")
        col_group_loop = (self.persistent or self.gluon_gemm2) and not (
            self.decode or self.grouped_mm or self.one_launch
        )
        if self.col_group2 and not col_group_loop:
            raise ValueError(
                "KernelConfig.col_group2: GEMM 2's tiles by column groups need its persistent Triton loop "
                "(persistent=True) or the Gluon GEMM 2, and not decode, grouped_mm or one_launch, got "
                f"persistent={self.persistent}, gluon={self.gluon}, gluon2={self.gluon2}, decode={self.decode}, "
                f"grouped_mm={self.grouped_mm}, one_launch={self.one_launch}"
            )
        if not self.fold_gemm2 and not self.fold_tails:
            raise ValueError("KernelConfig.fold_gemm2: False turns GEMM 2's fold off, so it needs fold_tails=True, got "
                             "fold_tails=False")  # fmt: skip
        if self.async_combine and not (self.gluon_gemm2 and self.persistent and not self.pingpong2):
            raise ValueError(
                "KernelConfig.async_combine: needs GEMM 2 in Gluon (gluon or gluon2) with persistent=True and not "
                f"pingpong2 (whose warpgroups overlap their epilogues already), got gluon={self.gluon}, "
                f"gluon2={self.gluon2}, persistent={self.persistent}, pingpong2={self.pingpong2}"
            )

    @property
    def gluon_gemm1(self) -> bool:
        """GEMM 1 runs as the Gluon kernel where Gluon can (``gluon`` or ``gluon1``)."""
        return self.gluon or self.gluon1

    @property
    def gluon_gemm2(self) -> bool:
        """GEMM 2 runs as the Gluon kernel where Gluon can (``gluon`` or ``gluon2``)."""
        return self.gluon or self.gluon2

    @property
    def fold_tails2(self) -> bool:
        """The Triton GEMM 2 folds its tails (``fold_tails`` and ``fold_gemm2``)."""
        return self.fold_tails and self.fold_gemm2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changes(self, base: KernelConfig | None = None) -> dict:
        """The fields whose value differs from ``base``'s (the defaults when None), in field order."""
        base = KernelConfig() if base is None else base
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> KernelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"KernelConfig.from_dict: unknown keys {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class MoEShape:
    """What a config depends on: tokens T, experts E, top-k K, hidden H, intermediate I."""

    num_tokens: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int


def token_bucket(num_tokens: int) -> int:
    """The power of two at or above ``num_tokens`` (1 for 0), capped at 16384."""
    return min(MAX_BUCKET, 1 << max(0, num_tokens - 1).bit_length())


def shape_key(shape: MoEShape, dtype: torch.dtype) -> str:
    return (
        f"E{shape.num_experts}_K{shape.top_k}_H{shape.hidden_size}_I{shape.intermediate_size}_"
        f"{_DTYPE_NAMES.get(dtype, str(dtype))}_T{token_bucket(shape.num_tokens)}"
    )


# How far (in factors of two of T) a tuned entry may be from T to stand in for its missing bucket. The default tuned
# counts are 4-8x apart (1, 8, 64, ..., 16384), so every T has one within this; an entry 6 octaves away (a decode
# entry at T = 5000) is a worse guess than the heuristic, whose rules follow the rows per expert.
NEAREST_ENTRY_OCTAVES = 2.0


# A dtype whose tables may be empty -> the dtype whose entries stand in for it: fp16 and bf16 operands are the same
# bytes at the same tensor-core rate, through the same kernels (the shipped tables are tuned in bf16 only).
STAND_IN_DTYPE_NAMES = {"fp16": "bf16"}


def table_entry(table: dict[str, KernelConfig], key: str, num_tokens: int) -> KernelConfig | None:
    """The config ``table`` holds for ``key`` at ``num_tokens`` tokens (``table_entry_key``'s entry), or None."""
    found = table_entry_key(table, key, num_tokens)
    return None if found is None else table[found]


def table_entry_key(table: dict[str, KernelConfig], key: str, num_tokens: int) -> str | None:
    """The key of the entry ``table`` (shape key -> KernelConfig) holds for the shape key ``key`` (``shape_key``) at
    ``num_tokens`` tokens: ``key`` itself, else the entry of the same layer (E, K, H, I) tuned at the token
    count nearest to ``num_tokens`` in factors of two, within ``NEAREST_ENTRY_OCTAVES``, in the key's dtype or its
    stand-in (``STAND_IN_DTYPE_NAMES``: fp16 takes bf16 entries); on a tie the key's own dtype, then the smaller
    count (whose tiles are no larger). A decode entry stands in only for fewer tokens than it was tuned at. None when
    nothing is that near.

    Why: a tuned entry carries the device's measured choices for the layer (forms, tiles, stages, split tails), which
    the heuristic cannot know; the tuner times each entry against the heuristic at its own T (1.07-1.16x faster at the
    H200 re-tune's points, bench/results/session9-probes.md). Not timed at the T between the tuned ones, nor in fp16,
    yet."""
    if key in table:
        return key
    head, sep, _ = key.rpartition("_T")
    if not sep:
        return None
    layer, _, dtype_name = head.rpartition("_")
    prefixes = [head + sep]
    if dtype_name in STAND_IN_DTYPE_NAMES:
        prefixes.append(f"{layer}_{STAND_IN_DTYPE_NAMES[dtype_name]}_T")
    tokens = max(1, num_tokens)
    best = None  # (octaves away, stand-in rank, tuned count), key
    for rank, prefix in enumerate(prefixes):
        for k in table:
            count = k[len(prefix) :]
            if not (k.startswith(prefix) and count.isdigit()):
                continue
            # the decode path only where it was measured to win, at or below its token count (its per-slot programs
            # re-read the weights per slot: the more slots, the worse)
            if table[k].decode and tokens > int(count):
                continue
            order = (abs(math.log2(tokens / int(count))), rank, int(count))
            if order[0] <= NEAREST_ENTRY_OCTAVES and (best is None or order < best[0]):
                best = (order, k)
    return None if best is None else best[1]


def table_path(device_name: str) -> Path:
    return TABLE_DIR / (re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json")


class _DeviceTable(dict):
    """A device's table (shape key -> KernelConfig) that remembers its ``table_entry`` look-ups: ``pick_config`` runs
    on every layer call, and a T between the tuned ones would scan the table each time (19-35 us on the host:
    bench/results/session10-compile-check.md)."""

    MAX_REMEMBERED = 1 << 16

    def __init__(self, entries: dict[str, KernelConfig], device: str = "") -> None:
        super().__init__(entries)
        self.device = device  # the GPU the table was tuned on (``same_model_table_path`` may lend it to another)
        self._entries: dict[tuple[str, int], str | None] = {}

    def entry_key(self, key: str, num_tokens: int) -> str | None:
        found = self._entries.get((key, num_tokens), self)  # self: not looked up yet
        if found is self:
            if len(self._entries) >= self.MAX_REMEMBERED:
                self._entries.clear()
            found = self._entries[(key, num_tokens)] = table_entry_key(self, key, num_tokens)
        return found


def same_model_table_path(device_name: str, table_dir: Path | None = None) -> Path | None:
    """A package table of the same GPU model in another form (the first two words of the names agree: "NVIDIA H100
    PCIe" or "NVIDIA H100 NVL" -> the "NVIDIA H100 80GB HBM3" table, "NVIDIA H200 NVL" -> "NVIDIA H200"), or None.
    Why: the same chip has the same shared memory and instruction set, so the entries run there, and they carry the
    measured choices (forms, tiles) that the heuristic cannot; fewer SMs or lower clocks may move the best tiles, which
    ``tilemoe tune`` on that GPU settles (its own table then wins). Not timed on such a GPU."""
    words = device_name.split()[:2]
    if len(words) < 2:
        return None
    for path in sorted((table_dir or TABLE_DIR).glob("*.json")):
        try:
            other = json.loads(path.read_text()).get("device", "")
        except (OSError, ValueError):
            continue
        if isinstance(other, str) and other.split()[:2] == words:
            return path
    return None


@functools.cache
def _load_table(device_name: str) -> _DeviceTable:
    path = table_path(device_name)
    if not path.exists():
        path = same_model_table_path(device_name)
        if path is None:
            return _DeviceTable({})
    data = json.loads(path.read_text())
    configs = {key: KernelConfig.from_dict(value) for key, value in data.get("configs", {}).items()}
    return _DeviceTable(configs, device=data.get("device", device_name))


# Row blocks of one expert per group when the tiles run expert by expert (``KernelConfig.expert_groups``), the
# heuristic's and the tuner's: of the 64 H100 points where expert_groups won, group_m 16 won 39, 32 16 and 8 nine
# (bench/NOTES.md, version 15)
EXPERT_GROUP_M = 16


def heuristic_config(shape: MoEShape, dtype: torch.dtype) -> KernelConfig:
    """Config for any shape from the rows per expert (a rule, no table).

    Few rows per expert (decode): the weights are the bytes, so small row tiles and narrow column tiles
    give many programs per expert to keep enough loads in flight. Many rows: large tiles for the matrix units.
    """
    slots = shape.num_tokens * shape.top_k
    rows_per_expert = slots / shape.num_experts
    fp32 = dtype == torch.float32
    few_experts = shape.num_experts <= 16  # large experts (Mixtral): tiles span many columns anyway
    # Rules read off `tilemoe tune` on an H100 (bench/NOTES.md, run 2): the decode config won or tied
    # at <= 16 rows per expert with many experts; BM=64 won 1.3-1.5x for Mixtral at T=64..256; the
    # 128x128 (two accumulators) / 128x256 config won every T >= 1024 point except two ties.
    if rows_per_expert <= 16 and not few_experts:
        return KernelConfig(
            block_m=16, block_n1=32, block_k1=64 if fp32 else 256, group_m1=1, num_warps1=4, num_stages1=3,
            block_n2=64, block_k2=64 if fp32 else 256, group_m2=1, num_warps2=4, num_stages2=3,
        )  # fmt: skip
    if rows_per_expert <= 48:  # (tune_cli.EXPERT_GROUPS_ABOVE_ROWS: the tuner's expert-grouped tiles start here too)
        if few_experts:
            return KernelConfig(
                block_m=64, block_n1=64, block_k1=64 if fp32 else 128, group_m1=8, num_warps1=4, num_stages1=3,
                block_n2=64, block_k2=64 if fp32 else 128, group_m2=8, num_warps2=4, num_stages2=3,
            )  # fmt: skip
        return KernelConfig(
            block_m=32, block_n1=64, block_k1=64 if fp32 else 128, group_m1=4, num_warps1=4, num_stages1=4,
            block_n2=64, block_k2=64 if fp32 else 128, group_m2=4, num_warps2=4, num_stages2=4,
        )  # fmt: skip
    if fp32:  # 4-byte operands: half the tile bytes per stage
        return KernelConfig(
            block_m=64, block_n1=64, block_k1=32, group_m1=8, num_warps1=4, num_stages1=3,
            block_n2=128, block_k2=32, group_m2=8, num_warps2=4, num_stages2=3,
        )  # fmt: skip
    # TMA weight boxes and 4 stages: GEMM 1 541 vs 594 us (FlashMoE's shape, T=8192), 1435 vs 1507 us
    # (qwen3-30b-a3b, T=16384) on an H100 (bench/NOTES.md, version 3); a persistent grid gave nothing there.
    # The tiles expert by expert, 16 blocks at a time: each expert's weights streamed from HBM once per 16 of its
    # blocks (version 15: the H100 entries with them beat the same entries without at 64 of 85 points, T >= 1024).
    return KernelConfig(
        block_m=128, block_n1=128, block_k1=64, group_m1=EXPERT_GROUP_M, num_warps1=8, num_stages1=4,
        block_n2=256, block_k2=64, group_m2=EXPERT_GROUP_M, num_warps2=8, num_stages2=4, tma=True,
        expert_groups=True,
    )  # fmt: skip


def pick_config(shape: MoEShape, dtype: torch.dtype, device: str | None) -> KernelConfig:
    """The config for ``shape`` in ``dtype`` on the GPU named ``device`` (``torch.cuda.get_device_name``).

    Pure: the same arguments give the same config. A tuned table entry when one exists for the device (or the same
    GPU model in another form, ``same_model_table_path``) and shape bucket (the tuner times torch's grouped GEMM there
    too), or for the same layer at a token count near T, or in bf16 for an fp16 layer (``table_entry``), else torch's
    grouped GEMM where ``prefers_grouped_mm``, else ``heuristic_config``; never missing (any device, including None
    for CPU/interpreter).
    """
    return _pick(shape, dtype, device)[0]


def config_source(shape: MoEShape, dtype: torch.dtype, device: str | None) -> str:
    """Where ``pick_config(shape, dtype, device)`` takes its config from: the table key (``table_entry_key``; another
    bucket's or dtype's when it stands in; "in <GPU>'s table" when another form's table stands in, see
    ``same_model_table_path``), "grouped_mm rule" or "heuristic". For the bench's CSV."""
    source = _pick(shape, dtype, device)[1]
    if source in ("grouped_mm rule", "heuristic") or _load_table(device).device == device:
        return source
    return f"{source} in {_load_table(device).device}'s table"  # a table key: device is a GPU name


def _pick(shape: MoEShape, dtype: torch.dtype, device: str | None) -> tuple[KernelConfig, str]:
    """``pick_config``'s decision: (the config, where it came from: a table key, "grouped_mm rule" or "heuristic")."""
    if device:
        table = _load_table(device)
        key = table.entry_key(shape_key(shape, dtype), shape.num_tokens)
        if key is not None:
            return table[key], key
        if prefers_grouped_mm(shape, dtype):
            return KernelConfig(block_m=16, grouped_mm=True), "grouped_mm rule"
    return heuristic_config(shape, dtype), "heuristic"


def prefers_grouped_mm(shape: MoEShape, dtype: torch.dtype) -> bool:
    """Few, large experts with many rows each: there the expert GEMMs are plain large GEMMs and the vendor grouped
    GEMM beats Triton's tiles (H100, mixtral-8x7b T=4096: CUTLASS 4166 us for both GEMMs in torch_grouped_mm,
    the Triton kernels 4862 us; bench/NOTES.md, version 3)."""
    rows_per_expert = shape.num_tokens * shape.top_k / shape.num_experts
    return (
        dtype in (torch.float16, torch.bfloat16)
        and shape.num_experts <= 16
        and shape.intermediate_size >= 8192
        and rows_per_expert >= 256
    )
