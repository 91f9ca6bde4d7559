"""``tilemoe tune``: search fused-MoE kernel configs on this GPU and write the winners into the package's tables.

    tilemoe tune --model all | NAME... [--models-from FILE] [--num-tokens 1 8 ... 16384] [--dtype bf16]
                 [--write | --out FILE] [--budget-s S] [--workers N] [--dry-run] [--variants FIELD=VALUE[,...] ...]
                 [--scenarios random imbalanced] [--rematch-rest R] [--rematch-top N] [--screen-rest R]

1. Plan: the models' MoE layers grouped by what the kernels see (E, K, H, I, activation, gated, bias,
   weights on input): each shape is tuned once and its table key (``tilemoe.tuning.shape_key``) serves every
   model that has it. Per token count (one per shape bucket) the candidates come from ``candidate_configs``.
2. Warm-up: N spawned worker processes on the same GPU each run ``fused_experts`` once per (shape, candidate)
   on small inputs (1 to 16 experts, up to a few thousand tokens: ``warmup_size``) chosen so that the kernels
   get the same specialization as the timed run; the compiled kernels land in the on-disk Triton cache, which
   the main process then reads (a first call that still compiles there is counted and reported).
   Triton compilation is CPU-bound and serial within one process, so this is where the cores pay off.
3. Timing, in the main process, one candidate at a time on random routing, by CUDA-graph replays (a graph of 10,
   3 or 1 calls by the call's length; back to back unless ``--screen-rest``); then the three fastest
   (``--rematch-top``) and the heuristic again, their graphs replayed in turn, resting between replays
   (``--rematch-rest``), and the fastest of that wins. Every candidate is checked against the heuristic config's
   output (itself checked against ``fused_experts_torch`` up to T=1024). The config in the device's table, when
   there is one, is timed second: a re-tune never writes a slower one; so is the config ``pick_config`` ran there
   before the run (``add_configs_in_use``: the nearest entry at an untuned bucket), whose time against the winner
   each point's line gives ("the config in use") and the table records (``in_use_us``). ``--variants``: only the
   heuristic, the table entry and the given changes of that entry are timed (e.g. ``split_tail=1``), each change's
   time against the entry's printed.
4. ``--budget-s``: the warm-up gets at most ``WARMUP_SHARE`` of it; each point gets a share of what is left;
   a point cut short keeps its best-so-far (the heuristic is always timed first), a point never reached is not
   written (``pick_config`` keeps the table entry, the one nearest in T, or the heuristic). The summary says which.
5. ``--write`` merges the winners into this device's table (``tilemoe.tuning.table_path``), ``--out FILE``
   into FILE, after each shape, keeping the other keys; the file records the device, torch/triton and date.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tilemoe.config import MoEConfig
from tilemoe.ops._launch import recording_stages
from tilemoe.ops.align import ONE_PROGRAM_MAX_SLOTS, align_capacity
from tilemoe.ops.grouped_mm import grouped_mm_available
from tilemoe.tuning import (
    EXPERT_GROUP_M,
    TABLE_DIR,
    KernelConfig,
    MoEShape,
    heuristic_config,
    pick_config,
    shape_key,
    table_entry,
    table_path,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKEN_COUNTS = [1, 8, 64, 256, 1024, 4096, 16384]
# Every timing is a CUDA-graph replay. do_bench above T=256 timed the host: its cache flush before each call drains
# the GPU's queue, so the eager launches (~20-40 us each) showed in the result; on an H100 the tuner measured
# deepseek-v2-lite T=1024 at 1199 us against 480 us in the bench's graph replays of the same config (session 5).
LONG_CALL_S = 2e-3  # above: one call per graph, fewer replays
REMATCH_TOP = 3  # the best few of the screening timed again in turn (a drifting clock then hits them alike)
# (``--rematch-top``: more where the screening, back to back at the power cap's clock, may rank a config that wins
# resting below the third; the rematch's replays share REMATCH_SECONDS, so more candidates get fewer rounds each)
REMATCH_SECONDS = 1.5  # of replays per point in the rematch, at most (the rests come on top)
# The rematch's idle time over replay time (``--rematch-rest``): at 4 the GPU runs a fifth of the time, near the
# bench's duty cycle, where each implementation's chunk of calls runs between the others' (session 29, on an H100).
REMATCH_REST = 4.0
# The screening's (``--screen-rest``): back to back by default, so a search covers as many candidates as before; at
# R each candidate's timing takes 1 + R times as long, and the screening ranks at the bench's duty cycle too.
SCREEN_REST = 0.0
# A rematch's winner replaces the config in use only when faster by this share: configs whose kernels cannot differ
# in cost (align_clears_out where the zeros hide) ran 0.996-1.002x of each other in turn on an H100 (session 26), and
# a re-tune wrote such noise winners into five entries.
REPLACE_MIN_GAIN = 0.005
# Of --budget-s. An estimate, not yet measured: ~1000 kernel compiles for the 17 presets (435 GEMM launches of
# two kernels, ~115 alignments) at ~2.5 s each on 16 cores is ~160 s of the 288 this gives at --budget-s 480.
WARMUP_SHARE = 0.6
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3}
REFERENCE_MAX_TOKENS = 1024  # heuristic checked against fused_experts_torch up to here (its loop over E is slow)
WARMUP_MAX_TOKENS = 4096  # 16 blocks of 128 rows at K=1 need 2048
WARMUP_MAX_EXPERTS = 16
FIRST_CALL_MISS_S = 0.5  # a first call slower than this compiled in the main process: the warm-up missed it
# Routings the tuner may time (``--scenarios``; their times are summed): random alone picked tiles that the bench's
# imbalanced(3.0) routing ran 13% slower at mixtral-8x7b T=256 (bench/NOTES.md, version 6)
TUNE_SCENARIOS = ("random", "balanced", "imbalanced")


def _cfg(bm, bn1, bk1, w1, s1, bn2, bk2, w2, s2, g=8, **flags) -> KernelConfig:
    return KernelConfig(
        block_m=bm, block_n1=bn1, block_k1=bk1, group_m1=g, num_warps1=w1, num_stages1=s1,
        block_n2=bn2, block_k2=bk2, group_m2=g, num_warps2=w2, num_stages2=s2, **flags,
    )  # fmt: skip


# (block_m, GEMM1: block_n, block_k, warps, stages, GEMM2: block_n, block_k, warps, stages)
CANDIDATES = [
    _cfg(16, 32, 128, 4, 4, 32, 128, 4, 4, g=1),
    _cfg(16, 64, 128, 4, 4, 64, 128, 4, 4, g=1),
    _cfg(16, 32, 256, 4, 3, 64, 256, 4, 3, g=1),
    _cfg(32, 64, 128, 4, 4, 64, 128, 4, 4, g=4),
    _cfg(32, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 3, 128, 64, 4, 3),
    _cfg(64, 64, 128, 4, 3, 64, 128, 4, 3),
    _cfg(128, 64, 64, 8, 4, 128, 64, 8, 4),
    _cfg(128, 128, 64, 8, 3, 256, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4),
    _cfg(128, 128, 64, 8, 3, 256, 64, 8, 3, g=16),
    _cfg(64, 128, 64, 4, 4, 256, 64, 8, 3),
    _cfg(128, 64, 64, 8, 3, 256, 64, 8, 4),
]
# Weight tiles through TMA descriptors (16-bit dtypes; 64-wide k boxes = 128 bytes), deeper pipelines: on an H100
# TMA with 4 stages gave GEMM 1 +5-10% at large T (bench/NOTES.md, version 3).
TMA_CANDIDATES = [
    _cfg(128, 128, 64, 8, 4, 128, 64, 4, 4, tma=True),
    _cfg(128, 64, 64, 4, 4, 128, 64, 4, 4, tma=True),
    _cfg(64, 128, 64, 4, 4, 128, 64, 4, 4, tma=True),
    _cfg(64, 64, 64, 4, 5, 128, 64, 4, 5, tma=True),
    _cfg(32, 64, 64, 4, 5, 128, 64, 4, 5, tma=True),
    _cfg(16, 64, 64, 4, 6, 64, 64, 4, 6, g=1, tma=True),
    # GEMM 2 persistent (flattened tile loop): 4-10% faster GEMM 2 at T >= 4096 on four of five H100 shapes,
    # 18% slower on gpt-oss-120b T=4096 (bench/NOTES.md, version 4): the tuner decides per shape
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4, tma=True, persistent=True),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 3, tma=True, persistent=True),
    _cfg(64, 128, 64, 4, 4, 128, 64, 4, 4, tma=True, persistent=True),
]
# GEMM 1 in the dense GEMM's form (``KernelConfig.sorted_x`` / ``gate_up_dot`` / ``persistent1``). Timed on the H100
# in session 7 (bench/NOTES.md, "Version 7 measured"): with the large-T tiles they won T = 16384 of the four bench
# models (-5 to -12%), mixtral T = 1024 / 4096 and deepseek T = 4096; without the copy of x (the second) where the
# rows are many (top-8 models). The [128, 128] accumulator on 4 warps lost at 11 of the 12 points (1.05-1.20x) and
# is no longer a candidate.
DENSE_GEMM1_CANDIDATES = [
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4, tma=True, sorted_x=True, gate_up_dot=True, persistent1=True,
         persistent=True),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4, tma=True, gate_up_dot=True, persistent1=True),
]  # fmt: skip
# Both GEMMs in one persistent launch (``KernelConfig.one_launch``): slower at all 12 points it was timed on the H100
# (1.03x at qwen3 T = 1024, the closest, to 1.36x at mixtral T = 1024; NOTES "Version 7 measured"). One candidate,
# that closest one's tiles, keeps it in the search for other GPUs and shapes at the cost of one compile per point.
ONE_LAUNCH_CANDIDATES = [
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4, tma=True, one_launch=True),
]
# The Gluon GEMMs (Hopper, 16-bit; elsewhere the launcher runs the Triton kernels in their place): GEMM 1 gathering x
# by token with GEMM 2 in ping-pong, and GEMM 1 alone in Gluon before the Triton GEMM 2. On an H100 the first won
# qwen3-30b-a3b and deepseek-v2-lite at T=4096 (0.91x / 0.95x of the entries, in turn) and mixtral-8x7b T=1024 (as a
# change of its Gluon entry); at the other nine T = 1024 / 4096 / 16384 points of the four bench models both tied or
# lost, by up to 10% (bench/results/session14-gluon-gather.md, call 2). The third: the gathering GEMM 1 with the
# [128, 256] GEMM 2 whose combine runs in warps of its own (``async_combine``): at qwen3-30b-a3b T=16384, where the
# ping-pong GEMM 2 had lost 33%, its kernels took 2061 us against the entry's 2165 on random routing (session 15,
# call B), but lost over random + imbalanced in the tune (1.02x); after the Triton GEMM 1, the same GEMM 2 won the
# three T=16384 points of qwen3 / deepseek-v2-lite / mixtral (0.96-0.99x, call C, as a ``--variants`` change of the
# Triton entries): the fourth candidate, on the dense-TMA Triton GEMM 1's tiles.
GLUON_CANDIDATES = [
    _cfg(128, 128, 64, 8, 4, 128, 64, 8, 6, tma=True, gate_up_dot=True, persistent1=True, persistent=True, gluon=True,
         gluon_gather=True, pingpong2=True),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4, tma=True, gate_up_dot=True, persistent1=True, persistent=True,
         gluon1=True, gluon_gather=True),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 3, tma=True, gate_up_dot=True, persistent1=True, persistent=True, gluon=True,
         gluon_gather=True, async_combine=True),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 3, tma=True, gate_up_dot=True, persistent1=True, persistent=True, gluon2=True,
         async_combine=True),
]  # fmt: skip
# The decode kernels (no alignment; ops/_kernels/_decode.py), tried where S = T*K <= DECODE_MAX_SLOTS: on an
# H200 they beat the 16-row tiles at T=4 for mixtral (528 vs 633 us) and gpt-oss, lost at T=1 (NOTES, version 3),
# before GEMM 2 ran per slot (``tilemoe.ops._fused_experts_launch.DECODE_GEMM2_PER_SLOT``); with it the
# first won T=1 of qwen3-30b-a3b, deepseek-v2-lite and gpt-oss-120b on the H100. The others vary its tiles (the
# GEMM 2 widths and depths first: GEMM 2 moved its weights at 2.1 TB/s there, GEMM 1 at 2.6).
DECODE_CANDIDATES = [
    _cfg(16, 64, 128, 4, 4, 32, 256, 4, 3, decode=True),
    _cfg(16, 32, 512, 4, 2, 16, 512, 4, 2, decode=True),
    _cfg(16, 64, 128, 4, 4, 64, 128, 4, 4, decode=True),
    _cfg(16, 32, 128, 4, 4, 32, 128, 4, 4, decode=True),
    _cfg(16, 64, 128, 4, 4, 16, 256, 4, 3, decode=True),
    _cfg(16, 64, 128, 4, 4, 64, 256, 4, 3, decode=True),
    _cfg(16, 64, 128, 4, 4, 32, 256, 4, 4, decode=True),
    _cfg(16, 32, 256, 4, 3, 32, 256, 4, 3, decode=True),
]
DECODE_MAX_SLOTS = 64
# torch's grouped GEMM (CUTLASS) for both GEMMs (16-bit, where torch has it), tried from this many rows per expert:
# it won mixtral-8x7b at T >= 1024 before GEMM 2's TMA input; the Triton tiles now tie or win there (version 4)
GROUPED_MM_CANDIDATE = KernelConfig(block_m=16, grouped_mm=True)
GROUPED_MM_MIN_ROWS = 128


# Split-tail twins (``KernelConfig.split_tail``) of the 64- and 128-row configs, from this many rows per expert: a
# random routing then leaves about half the experts a last block under half full.
SPLIT_TAIL_MIN_ROWS = 32
# candidate_configs never prunes tiles of this many rows or more for being small against the rows per expert
MIN_BLOCK_M_CAP = 128


def _split_twin(cfg: KernelConfig) -> tuple[KernelConfig, ...]:
    if cfg.block_m < 64 or cfg.decode or cfg.grouped_mm or cfg.split_tail or (cfg.persistent1 and cfg.persistent):
        return ()  # (both GEMMs persistent: full tiles only, a twin would time the same kernels)
    return (dataclasses.replace(cfg, split_tail=True),)


# Above this many rows per expert (where the heuristic takes its 128-row tiles), the candidates of 128 rows or more
# run their tiles expert by expert (``expert_groups``, EXPERT_GROUP_M blocks at a time), as the heuristic's do, in
# place of their plain order: expert by expert won 64 of 85 H100 points at T >= 1024 in turn, and the config in use,
# whatever its order, is always timed (bench/NOTES.md, version 15)
EXPERT_GROUPS_ABOVE_ROWS = 48


def _expert_grouped(cfg: KernelConfig) -> KernelConfig:
    if cfg.block_m < 128 or cfg.decode or cfg.grouped_mm or cfg.expert_groups:
        return cfg
    return dataclasses.replace(cfg, expert_groups=True, group_m1=EXPERT_GROUP_M, group_m2=EXPERT_GROUP_M)


def candidate_configs(shape: MoEShape, dtype: torch.dtype) -> list[KernelConfig]:
    """The configs ``tilemoe tune`` times for ``shape`` in ``dtype``: the heuristic first, then ``CANDIDATES``
    (+ ``TMA_CANDIDATES``, ``DENSE_GEMM1_CANDIDATES``, ``ONE_LAUNCH_CANDIDATES`` and ``GLUON_CANDIDATES`` for 16-bit
    dtypes, + ``DECODE_CANDIDATES`` for S <= ``DECODE_MAX_SLOTS``) that can
    win, the likeliest first (block_m nearest the heuristic's), without repeats; last ``GROUPED_MM_CANDIDATE``
    (16-bit, from ``GROUPED_MM_MIN_ROWS`` rows per expert, where torch's grouped GEMM runs on this machine).

    From ``SPLIT_TAIL_MIN_ROWS`` rows per expert, each config of 64 rows or more is followed by its split-tail twin;
    above ``EXPERT_GROUPS_ABOVE_ROWS``, those of 128 rows or more run their tiles expert by expert.
    Pruned: block_m over 4x the mean rows per expert (T*K/E), floor 16: such a tile is mostly padding rows
    (the busiest expert of a random routing rarely gets 4x the mean); block_m under 1/16 of it, capped at
    ``MIN_BLOCK_M_CAP``: 128-row tiles won every T >= 1024 point of the H100 runs (bench/NOTES.md, run 2), so much
    smaller ones are not tried, but 128 rows always are (uncapped, mixtral T=16384's 4096 rows per expert left only
    the 256-row tiles, the heuristic and the grouped GEMM: on the H200 the grouped GEMM won there, session 9).
    """
    base = heuristic_config(shape, dtype)
    rows_per_expert = shape.num_tokens * shape.top_k / shape.num_experts
    max_block_m = max(16, 4 * rows_per_expert)
    min_block_m = min(rows_per_expert / 16, MIN_BLOCK_M_CAP)
    pool = list(CANDIDATES)
    if dtype in (torch.float16, torch.bfloat16):
        pool += TMA_CANDIDATES + DENSE_GEMM1_CANDIDATES + ONE_LAUNCH_CANDIDATES + GLUON_CANDIDATES
    if shape.num_tokens * shape.top_k <= DECODE_MAX_SLOTS:
        pool += DECODE_CANDIDATES
    if rows_per_expert > EXPERT_GROUPS_ABOVE_ROWS:
        pool = [_expert_grouped(c) for c in pool]
    rest = [c for c in dict.fromkeys(pool) if c != base and min_block_m <= c.block_m <= max_block_m]
    rest.sort(key=lambda c: abs(math.log2(c.block_m) - math.log2(base.block_m)))  # stable: list order breaks ties
    if rows_per_expert >= SPLIT_TAIL_MIN_ROWS:  # each 64/128-row config then its split-tail twin
        rest = [*_split_twin(base), *(twin for c in rest for twin in (c, *_split_twin(c)))]
    # its block_m is only the row alignment of the grouped GEMM's groups: not pruned by the tile rule above
    grouped = dtype in (torch.float16, torch.bfloat16) and rows_per_expert >= GROUPED_MM_MIN_ROWS
    if grouped and grouped_mm_available("cuda", dtype) and base != GROUPED_MM_CANDIDATE:
        rest.append(GROUPED_MM_CANDIDATE)
    return [base, *rest]


# ------------------------------------------------------------------------------------------------- timers
def graph_seconds(fn, calls: int = 10, replays: int = 10, rest: float = 0.0) -> float:
    """Median time of one call, from replays of a CUDA graph holding ``calls`` calls; ``rest``: the GPU idles that
    many times each replay's length after it (``graph_us_in_turn``)."""
    from tilemoe.bench.timing import capture_graph, graph_us_in_turn

    graph, _ = capture_graph(fn, calls)
    graph.replay()
    torch.cuda.synchronize()
    return graph_us_in_turn([(graph, calls)], replays, rest=rest)[0] * 1e-6


def events_seconds(fn, reps: int) -> float:
    """Median of ``reps`` calls, each timed alone with CUDA events."""
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2] * 1e-3


def screen_timer(rest: float):
    """The screening's ``timer(fn, num_tokens) -> seconds``: ``time_call`` resting ``rest`` (``--screen-rest``)."""
    return functools.partial(time_call, rest=rest)


def graph_calls(estimate_s: float) -> int:
    """Calls per CUDA graph for a call of about ``estimate_s``: enough that one replay is not launch-bound."""
    return 10 if estimate_s < 2e-4 else 3 if estimate_s < LONG_CALL_S else 1


def time_call(fn, num_tokens: int, rest: float = SCREEN_REST) -> float:
    """Seconds per call of ``fn`` (already run once), from CUDA-graph replays; fewer replays for long calls.
    ``rest``: idle time over replay time after each replay (``--screen-rest``)."""
    estimate = events_seconds(fn, 1)
    calls = graph_calls(estimate)
    return graph_seconds(fn, calls=calls, replays=10 if estimate * calls < 5e-3 else 5, rest=rest)


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class ShapeGroup:
    """Models whose MoE layers the kernels cannot tell apart: tuned once, one table key per token bucket.

    key: (E, K, H, I, activation, gated, expert_bias, weights_on_input, swiglu_alpha, swiglu_limit).
    config: the first model's MoEConfig (what the tuner builds weights and routing from).
    """

    key: tuple
    config: MoEConfig
    models: list[str]


@dataclass
class TunePoint:
    """One (shape, token count): its candidates and, once tuned, what the timing found.

    status: "pending", "tuned" (every candidate timed), "cut" (budget ran out: best so far kept),
    "skipped" (budget ran out first: nothing written), "failed" (the heuristic itself failed the check).
    """

    group: ShapeGroup
    num_tokens: int
    table_key: str
    candidates: list[KernelConfig]
    status: str = "pending"
    best: KernelConfig | None = None
    best_s: float | None = None
    heuristic_s: float | None = None
    timed: int = 0
    errors: list[str] = field(default_factory=list)
    times: list[tuple[KernelConfig, float]] = field(default_factory=list)  # (candidate, seconds) as timed
    entry: KernelConfig | None = None  # with --variants: the config the variants change
    in_use: KernelConfig | None = None  # what ``pick_config`` ran here before this run (``add_configs_in_use``)
    # a candidate whose stage counts Triton refused (too much shared memory) -> the config it ran as
    # (``tilemoe.ops._launch.launch_fitting`` lowered them): what the table gets and what the lines compare
    ran_as: dict[KernelConfig, KernelConfig] = field(default_factory=dict)
    rematch: list[tuple[KernelConfig, float]] = field(default_factory=list)  # the best few timed again, in turn

    @property
    def shape(self) -> MoEShape:
        c = self.group.config
        return MoEShape(self.num_tokens, c.num_experts, c.top_k, c.hidden_size, c.intermediate_size)

    def runs_as(self, cfg: KernelConfig | None) -> KernelConfig | None:
        """``cfg`` with the stage counts its timed launches ran at."""
        return self.ran_as.get(cfg, cfg)


def kernel_shape_key(config: MoEConfig) -> tuple:
    """What the fused-experts kernels depend on in ``config`` (besides T and dtype)."""
    return (
        config.num_experts, config.top_k, config.hidden_size, config.intermediate_size, config.activation,
        config.gated, config.expert_bias, config.weights_on_input, config.swiglu_alpha, config.swiglu_limit,
    )  # fmt: skip


def group_shapes(models: list[str], configs: dict[str, MoEConfig] | None = None) -> list[ShapeGroup]:
    """``models`` (preset names / config.json paths) grouped by ``kernel_shape_key``, in first-seen order.

    ``configs``: already loaded configs by model name (tests); the rest come from ``MoEConfig.from_pretrained``.
    """
    groups: dict[tuple, ShapeGroup] = {}
    for model in dict.fromkeys(models):
        config = (configs or {}).get(model) or MoEConfig.from_pretrained(model)
        key = kernel_shape_key(config)
        if key in groups:
            groups[key].models.append(model)
        else:
            groups[key] = ShapeGroup(key, config, [model])
    return list(groups.values())


def plan_points(groups: list[ShapeGroup], token_counts: list[int], dtype: torch.dtype, log=print) -> list[TunePoint]:
    """One point per (group, token bucket), group by group, T ascending; table keys deduplicated.

    Two groups that differ only where ``shape_key`` does not look (activation, bias, ...) would write the same
    table key: the first is tuned, the clash is logged. Raises ValueError for a token count below 1.
    """
    bad = [t for t in token_counts if not isinstance(t, int) or t < 1]
    if bad:
        raise ValueError(f"num_tokens: expected ints >= 1, got {bad}")
    points, owner, clashes = [], {}, set()
    for group in groups:
        c = group.config
        for t in sorted(set(token_counts)):
            shape = MoEShape(t, c.num_experts, c.top_k, c.hidden_size, c.intermediate_size)
            key = shape_key(shape, dtype)
            if key in owner:
                if owner[key] is not group and (id(group), id(owner[key])) not in clashes:
                    clashes.add((id(group), id(owner[key])))
                    log(f"tune: {'/'.join(group.models)} shares table key {key} with {'/'.join(owner[key].models)} "
                        "(the key has no activation/bias): tuned for the first")  # fmt: skip
                continue
            owner[key] = group
            points.append(TunePoint(group, t, key, candidate_configs(shape, dtype)))
    return points


def resolve_models(names: list[str], models_from: str | None = None) -> list[str]:
    """Model names: "all" expands to every preset; ``models_from`` adds one name per line (# comments)."""
    from tilemoe.hf_config import list_presets

    names = list(names or [])
    if models_from:
        for line in Path(models_from).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    out = []
    for name in names:
        out.extend(list_presets() if name == "all" else [name])
    if not out:
        raise ValueError("models: expected --model NAME... or --models-from FILE, got no model")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ warm-up
@dataclass(frozen=True, eq=False)
class WarmTask:
    """One warm-up launch with ``kernel_config``: ``fused_experts`` on ``num_tokens`` tokens and ``num_experts``
    experts (few: ``warmup_size``), or with ``align_only`` just ``moe_align`` at the real T and E."""

    config: MoEConfig
    dtype: str
    num_tokens: int
    kernel_config: KernelConfig
    align_only: bool = False
    num_experts: int = 1


def launch_ints(num_tokens: int, top_k: int, num_experts: int, cfg: KernelConfig) -> tuple[int, ...]:
    """The integer kernel arguments of ``fused_experts`` with ``cfg`` that depend on T or E: num_tokens (the
    combine), num_slots and num_blocks_m (the GEMMs); none for the decode kernels (T only sizes their grid).

    Mirrors ``tilemoe.ops._fused_experts_launch._launch``; extend it when that launcher passes another such int.
    """
    if getattr(cfg, "decode", False):
        return ()
    num_slots = num_tokens * top_k
    return num_tokens, num_slots, align_capacity(num_slots, num_experts, cfg.block_m) // cfg.block_m


def _int_class(value: int) -> tuple[bool, bool, bool, bool]:
    # What Triton specializes an int argument on (3.6 and 3.9): == 1, divisible by 16, 32-bit range; 0 for safety.
    return value == 1, value % 16 == 0, value == 0, -(2**31) <= value < 2**31


def warmup_size(num_tokens: int, top_k: int, num_experts: int, cfg: KernelConfig) -> tuple[int, int] | None:
    """(tokens, experts) of a small launch that specializes the kernels of ``cfg`` as (``num_tokens``,
    ``num_experts``) does: fewest experts first (the weights are the memory), then fewest tokens; None when
    none up to ``WARMUP_MAX_TOKENS`` x ``WARMUP_MAX_EXPERTS`` does (the main process then compiles it)."""
    target = tuple(_int_class(v) for v in launch_ints(num_tokens, top_k, num_experts, cfg))
    return _first_size_with(target, top_k, min(num_experts, WARMUP_MAX_EXPERTS), cfg)


@functools.cache
def _first_size_with(target: tuple, top_k: int, max_experts: int, cfg: KernelConfig) -> tuple[int, int] | None:
    for e in range(1, max_experts + 1):
        for t in range(1, WARMUP_MAX_TOKENS + 1):
            if tuple(_int_class(v) for v in launch_ints(t, top_k, e, cfg)) == target:
                return t, e
    return None


def warmup_tasks(points: list[TunePoint], dtype: torch.dtype) -> list[WarmTask]:
    """The launches that compile every kernel the timing of ``points`` will run, each once, in timing order."""
    name = next(k for k, v in DTYPES.items() if v == dtype)
    tasks, seen = [], set()
    for p in points:
        c = p.group.config
        for cfg in p.candidates:
            size = warmup_size(p.num_tokens, c.top_k, c.num_experts, cfg)
            if size is not None and (p.group.key, cfg, size) not in seen:
                seen.add((p.group.key, cfg, size))
                tasks.append(WarmTask(c, name, size[0], cfg, num_experts=size[1]))
            if getattr(cfg, "decode", False) or p.num_tokens * c.top_k > ONE_PROGRAM_MAX_SLOTS:
                continue  # no alignment, or the torch one (no Triton kernel)
            align = (c.top_k, c.num_experts, cfg.block_m, p.num_tokens)
            if ("align", align) not in seen:
                seen.add(("align", align))
                tasks.append(WarmTask(c, name, p.num_tokens, cfg, align_only=True, num_experts=c.num_experts))
    return tasks


def partition(items: list, num_workers: int, chunks_per_worker: int = 8) -> list[list]:
    """``items`` in order, cut into about ``num_workers * chunks_per_worker`` consecutive chunks whose sizes
    differ by at most one (many small chunks: the pool balances them, and a budget cut waits for one chunk).
    Raises ValueError for num_workers < 1."""
    if num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
    if not items:
        return []
    n = min(len(items), num_workers * chunks_per_worker)
    size, extra = divmod(len(items), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks


def _worker_init() -> None:
    torch.set_num_threads(1)  # 16 workers on 16 cores: the compiler is the work, not torch's CPU ops


def run_warm_task(task: WarmTask, device: str) -> None:
    """Run ``task`` once on ``device`` (compiles its kernels into the Triton cache). Raises what the launch raises."""
    from tilemoe.ops.align import moe_align
    from tilemoe.ops.fused_experts import fused_experts

    c, dtype = task.config, DTYPES[task.dtype]
    ids = torch.zeros(task.num_tokens, c.top_k, dtype=torch.int32, device=device)
    if task.align_only:
        moe_align(ids, task.num_experts, task.kernel_config.block_m)
        if device == "cuda":
            torch.cuda.synchronize()
        return
    e, h, i = task.num_experts, c.hidden_size, c.intermediate_size
    x = torch.zeros(task.num_tokens, h, dtype=dtype, device=device)
    w13 = torch.zeros(e, c.w13_rows, h, dtype=dtype, device=device)
    w2 = torch.zeros(e, h, i, dtype=dtype, device=device)
    b13 = torch.zeros(e, c.w13_rows, dtype=dtype, device=device) if c.expert_bias else None
    b2 = torch.zeros(e, h, dtype=dtype, device=device) if c.expert_bias else None
    weights = torch.full((task.num_tokens, c.top_k), 1.0 / c.top_k, dtype=torch.float32, device=device)
    fused_experts(x, w13, w2, weights, ids, config=c, b13=b13, b2=b2, kernel_config=task.kernel_config)
    if device == "cuda":
        torch.cuda.synchronize()


def warm_chunk(tasks: list[WarmTask]) -> list[str | None]:
    """Worker entry: each task run once on the GPU (CPU without one); per task None or the error text."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for task in tasks:
        try:
            run_warm_task(task, device)
            out.append(None)
        except Exception as error:  # a config that does not fit (shared memory, registers) is a result here
            out.append(f"{type(error).__name__}: {str(error)[:200]}")
    return out


@dataclass
class WarmupReport:
    tasks: int = 0
    done: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0


def warm_up(
    tasks: list[WarmTask], num_workers: int, deadline: float | None = None, grace_s: float = 60.0, chunk_fn=None
) -> WarmupReport:
    """Run ``tasks`` in ``num_workers`` spawned processes (CUDA needs spawn), until done or ``deadline``
    (``time.monotonic``). Chunks are handed out one per free worker, so at the deadline the rest are simply not
    started (cancelled); the running ones get ``grace_s`` more seconds, then the workers still busy (a hung
    compile) are killed and their tasks count as lost. ``chunk_fn``: the worker entry (default ``warm_chunk``;
    a module-level function, for tests)."""
    report = WarmupReport(tasks=len(tasks))
    start = time.monotonic()
    pending = partition(tasks, num_workers)[::-1]  # popped from the end: in timing order
    if not pending:
        return report
    report.workers = min(num_workers, len(pending))
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(report.workers, mp_context=spawn, initializer=_worker_init)
    running: dict = {}

    def collect(future) -> None:
        chunk = running.pop(future)
        try:
            results = future.result()
        except Exception as error:  # a worker died or was killed: its chunk is left to the main process
            report.errors.append(f"{len(chunk)} tasks lost: {type(error).__name__}: {error}")
            return
        report.done += len(chunk)
        report.errors.extend(
            f"{t.config.name} T={t.num_tokens} {t.kernel_config}: {r}" for t, r in zip(chunk, results) if r
        )

    killed = False
    try:
        while pending and len(running) < report.workers:
            chunk = pending.pop()
            running[pool.submit(chunk_fn or warm_chunk, chunk)] = chunk
        processes = dict(getattr(pool, "_processes", None) or {})  # private; the only handle on a hung worker
        while running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            done, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
            for future in done:
                collect(future)
                if pending and (deadline is None or time.monotonic() < deadline):
                    chunk = pending.pop()
                    running[pool.submit(chunk_fn or warm_chunk, chunk)] = chunk
        report.cancelled = sum(len(chunk) for chunk in pending)
        if running:
            wait(running, timeout=grace_s)
            if not all(f.done() for f in running):
                killed = True
                for process in processes.values():
                    process.kill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # joins the workers: their GPU memory is free for the timing
    for future in list(running):
        collect(future)
    if killed:
        report.errors.append(f"workers killed after {grace_s:.0f} s past the deadline")
    report.seconds = time.monotonic() - start
    return report


# ------------------------------------------------------------------------------------------------- timing
class Budget:
    """A wall-clock budget from now (None: unlimited); ``clock`` is injectable for tests."""

    def __init__(self, seconds: float | None, clock=time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline = None if seconds is None else self.start + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def expired(self) -> bool:
        return self.left() <= 0

    def at(self, share: float) -> float | None:
        """The clock time ``share`` of the way through the budget (None when unlimited)."""
        return None if self.deadline is None else self.start + share * (self.deadline - self.start)


def point_slice(budget: Budget, points_left: int) -> float:
    """Seconds one point may take: 1.5x its even share of what is left, so large-T points can borrow what
    small-T points (earlier in each group) did not use."""
    return 1.5 * budget.left() / max(1, points_left)


def search_point(point: TunePoint, measure, budget: Budget, slice_s: float) -> None:
    """Time ``point.candidates`` in order with ``measure(cfg) -> seconds`` (raises on a wrong or failing
    candidate) and record the best. The heuristic (first) is always timed; the others while the point's slice
    and the budget last. Sets status "tuned", "cut" or "failed" (the heuristic failed: nothing to compare to)."""
    start = budget.clock()
    for n, cfg in enumerate(point.candidates):
        if n > 0 and (budget.expired() or budget.clock() - start > slice_s):
            point.status = "cut"
            return
        try:
            seconds = measure(cfg)
        except Exception as error:
            point.errors.append(f"{cfg}: {type(error).__name__}: {str(error)[:300]}")
            if n == 0:
                point.status = "failed"
                return
            continue
        point.timed += 1
        point.times.append((cfg, seconds))
        if n == 0:
            point.heuristic_s = seconds
        if point.best_s is None or seconds < point.best_s:
            point.best, point.best_s = cfg, seconds
    point.status = "tuned"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    # On the device: a float64 copy to the host costs ~1 s per call at T=16384, H=7168.
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _device_weights(config: MoEConfig, dtype: torch.dtype, device: torch.device):
    # Drawn in ``dtype`` directly: an fp32 draw of Kimi-K2's w13 (45 GB) would not fit beside it.
    def rnd(*shape, scale):
        return torch.empty(*shape, dtype=dtype, device=device).normal_(0.0, scale)

    h, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    w13, w2 = rnd(e, config.w13_rows, h, scale=h**-0.5), rnd(e, h, i, scale=i**-0.5)
    if not config.expert_bias:
        return w13, w2, None, None
    return w13, w2, rnd(e, config.w13_rows, scale=0.1), rnd(e, h, scale=0.1)


class _Measure:
    """``measure(cfg) -> seconds`` for ``search_point`` at one point: the sum over its routings (``cases``: one
    (args, reference) pair per scenario; a None reference becomes the first candidate's output, the heuristic's);
    ``misses[0]`` counts the first calls that compiled in this process."""

    def __init__(
        self, cases: list[list], kwargs: dict, num_tokens: int, dtype: torch.dtype, misses: list[int], timer,
        ran_as: dict | None = None, rematch_rest: float = REMATCH_REST, rematch_top: int = REMATCH_TOP,
    ):  # fmt: skip
        self.cases, self.kwargs, self.num_tokens, self.dtype = cases, kwargs, num_tokens, dtype
        self.misses, self.timer = misses, timer
        self.ran_as = {} if ran_as is None else ran_as  # (TunePoint.ran_as)
        self.rematch_rest = rematch_rest  # idle time over replay time in the rematch (``--rematch-rest``)
        self.rematch_top = rematch_top  # the screening's fastest that the rematch times again (``--rematch-top``)

    @property
    def args(self) -> tuple:  # the first routing's arguments
        return self.cases[0][0]

    def __call__(self, cfg: KernelConfig) -> float:
        from tilemoe.ops.fused_experts import fused_experts

        total = 0.0
        for case in self.cases:
            args, ref = case

            def call(args=args):
                return fused_experts(*args, kernel_config=cfg, **self.kwargs)

            first = time.monotonic()
            with recording_stages() as stages:
                out = call().float()
            if out.is_cuda:
                torch.cuda.synchronize()
            lowered = {name: n for name, n in stages.items() if n < getattr(cfg, name)}
            if lowered:
                self.ran_as[cfg] = dataclasses.replace(cfg, **lowered)
            if time.monotonic() - first > FIRST_CALL_MISS_S:
                self.misses[0] += 1
            if ref is None:  # the heuristic's output: the reference of the others above REFERENCE_MAX_TOKENS
                case[1] = ref = out
            err = _relative_error(out, ref)
            if not err <= REL_TOL[self.dtype]:  # also catches NaN
                raise ValueError(f"relative error {err:.2e} > {REL_TOL[self.dtype]:.0e}")
            total += self.timer(call, self.num_tokens)
        return total

    def rematch(self, point: TunePoint) -> None:
        """Time the ``rematch_top`` fastest candidates of the screening and the heuristic again, their graphs (one per
        routing) replayed in turn, and keep the fastest sum of that; the best and heuristic times become these. A CUDA
        device only: the screening timed one candidate after the other, so a clock drifting under the power cap
        favoured the early ones."""
        from tilemoe.bench.timing import capture_graph, graph_us_in_turn
        from tilemoe.ops.fused_experts import fused_experts

        top = rematch_candidates(point, self.rematch_top)
        if len(top) < 2 or not self.args[0].is_cuda:
            return
        graphs = []
        for cfg, seconds in top:
            calls = graph_calls(seconds / len(self.cases))
            for args, _ in self.cases:
                fn = functools.partial(fused_experts, *args, kernel_config=cfg, **self.kwargs)
                graph, _ = capture_graph(fn, calls)
                graphs.append((graph, calls))
        per_round = sum(seconds * graph_calls(seconds / len(self.cases)) for _, seconds in top)
        rounds = max(3, min(15, int(REMATCH_SECONDS / per_round)))
        us = graph_us_in_turn(graphs, rounds, rest=self.rematch_rest)
        n = len(self.cases)
        point.rematch = [(cfg, sum(us[i * n : (i + 1) * n]) * 1e-6) for i, (cfg, _) in enumerate(top)]
        point.best, point.best_s = rematch_winner(point.rematch, point.in_use)
        point.heuristic_s = next(t for cfg, t in point.rematch if cfg == point.times[0][0])


def rematch_candidates(point: TunePoint, top_n: int = REMATCH_TOP) -> list[tuple[KernelConfig, float]]:
    """The (config, screening seconds) that ``_Measure.rematch`` times again: the ``top_n`` fastest of the
    screening, the heuristic (its time is the table's reference) and the config in use (the entry a new best would
    replace: timed only in the screening, it was compared with the rematch's times, a different clock under the power
    cap, and two points of session 12 wrote a best that their config in use beat, 0.96x)."""
    top = sorted(point.times, key=lambda item: item[1])[:top_n]
    for must in (point.times[0][0] if point.times else None, point.in_use):
        timed = next((item for item in point.times if item[0] == must), None)
        if timed is not None and timed not in top:
            top.append(timed)
    return top


def rematch_winner(
    rematch: list[tuple[KernelConfig, float]], in_use: KernelConfig | None
) -> tuple[KernelConfig, float]:
    """The (config, seconds) a rematch keeps: the fastest, unless the config in use ran within ``REPLACE_MIN_GAIN``
    of it, which then stays (a table changes only for a gain larger than the rematch's noise)."""
    best = min(rematch, key=lambda item: item[1])
    kept = next((item for item in rematch if item[0] == in_use), None)
    if kept is not None and kept[1] <= best[1] * (1 + REPLACE_MIN_GAIN):
        return kept
    return best


def search_points(points: list[TunePoint], measure_for, budget: Budget, points_left: int, log=print) -> None:
    """``search_point`` on each point in turn, ``measure_for(point)`` giving its measure; ``points_left``: points
    still to go in the whole run (this list included), for the slices. Points reached after the budget ran out
    are marked "skipped"."""
    for point in points:
        if budget.expired():
            point.status = "skipped"
        else:
            measure = measure_for(point)
            search_point(point, measure, budget, point_slice(budget, points_left))
            if hasattr(measure, "rematch") and not budget.expired():
                measure.rematch(point)
            log(_point_line(point))
        points_left -= 1


def tune_group(
    points: list[TunePoint], dtype: torch.dtype, budget: Budget, points_left: int, log=print, device="cuda",
    timer=time_call, scenarios: tuple[str, ...] = ("random",), rematch_rest: float = REMATCH_REST,
    rematch_top: int = REMATCH_TOP,
) -> int:  # fmt: skip
    """Time the points of one shape group (weights built once), ``points_left`` points to go in all.
    ``timer(fn, num_tokens) -> seconds``; ``device``: "cuda" (tests: "cpu" in the interpreter, with a wall-clock
    timer); ``scenarios``: the routings (``tilemoe.bench.scenarios``, imbalanced with factor 3.0) whose times are
    summed into a candidate's time. Returns how many first calls compiled in this process (warm-up misses)."""
    from tilemoe.bench.scenarios import make_routing_for
    from tilemoe.ops.fused_experts import fused_experts_torch

    config = points[0].group.config
    device = torch.device(device)
    w13, w2, b13, b2 = _device_weights(config, dtype, device)
    kwargs = dict(config=config, b13=b13, b2=b2)
    gen = torch.Generator().manual_seed(0)
    misses = [0]

    def measure_for(point: TunePoint) -> _Measure:
        t = point.num_tokens
        x = torch.randn(t, config.hidden_size, device=device, dtype=torch.float32).to(dtype)
        cases = []
        for scenario in scenarios:
            tw, ti = make_routing_for(scenario, t, config, generator=gen, x=x, device=device)
            args = (x, w13, w2, tw.float().contiguous(), ti.to(torch.int32).contiguous())
            ref = fused_experts_torch(*args, **kwargs).float() if t <= REFERENCE_MAX_TOKENS else None
            cases.append([args, ref])
        return _Measure(cases, kwargs, t, dtype, misses, timer, point.ran_as, rematch_rest, rematch_top)

    search_points(points, measure_for, budget, points_left, log)
    return misses[0]


def _point_line(p: TunePoint) -> str:
    models = "/".join(p.group.models)
    if p.best_s is None:
        return f"{models} T={p.num_tokens}: {p.status} ({'; '.join(p.errors)[:400]})"
    line = (
        f"{models} T={p.num_tokens}: best {p.best_s * 1e6:.1f} us (heuristic {p.heuristic_s * 1e6:.1f} us, "
        f"{p.heuristic_s / p.best_s:.2f}x; {p.timed}/{len(p.candidates)} timed) {p.best}"
    )
    ran = p.runs_as(p.best)
    if ran != p.best:
        line += f" [ran as num_stages1={ran.num_stages1}, num_stages2={ran.num_stages2}]"
    in_use_s = _time_of(p, p.in_use)
    if p.in_use is not None and p.runs_as(p.in_use) == ran:
        line += " [the config in use: kept]"
    elif in_use_s is not None:
        line += f" [the config in use: {in_use_s * 1e6:.1f} us, {in_use_s / p.best_s:.2f}x]"
    if p.status == "cut":
        line += " [budget: best so far]"
    if p.errors:
        line += f" [{len(p.errors)} candidates failed: {p.errors[0][:200]}]"
    return line


def _variant_lines(p: TunePoint) -> str:
    lines = [f"variants {'/'.join(p.group.models)} T={p.num_tokens}:"]
    entry_s = next((seconds for cfg, seconds in p.times if cfg == p.entry), None)
    for n, (cfg, seconds) in enumerate(p.times):
        role = "entry" if cfg == p.entry else "heuristic" if n == 0 else "variant"
        ratio = f" ({seconds / entry_s:.3f}x entry)" if entry_s and role == "variant" else ""
        lines.append(f"  {role} {seconds * 1e6:.1f} us{ratio} {cfg}")
    if p.rematch:
        entry_t = next((seconds for cfg, seconds in p.rematch if cfg == p.entry), None)
        for cfg, seconds in p.rematch:
            ratio = f" ({seconds / entry_t:.3f}x entry)" if entry_t and cfg != p.entry else ""
            role = "entry" if cfg == p.entry else "other"
            lines.append(f"  in turn: {role} {seconds * 1e6:.1f} us{ratio} {cfg}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- table
def merge_table(path: Path, device: str, configs: dict[str, dict], measured: dict[str, dict] | None = None) -> dict:
    """Merge ``configs`` (shape key -> KernelConfig dict) into the table file at ``path`` (created when absent),
    keeping its other keys; record device, torch/triton versions and the UTC date. Written atomically.

    Raises ValueError when the file holds another device's table.
    """
    import triton

    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("device", device) != device:
        raise ValueError(f"{path}: expected a table of device {device!r}, got one of {data['device']!r}")
    data["device"] = device
    data["torch"] = torch.__version__
    data["triton"] = triton.__version__
    data["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data.setdefault("configs", {}).update(configs)
    if measured:
        data.setdefault("measured", {}).update(measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return data


def _results(points: list[TunePoint], scenarios: tuple[str, ...] = ("random",)) -> tuple[dict, dict]:
    """(configs, measured) by table key for the points that have a best config; the times are sums over
    ``scenarios``, which the measured entry names when it is not random routing alone."""
    configs, measured = {}, {}
    for p in points:
        if p.best is None:
            continue
        configs[p.table_key] = p.runs_as(p.best).to_dict()  # as it ran: the stage counts Triton took
        measured[p.table_key] = {
            "models": p.group.models, "tokens": p.num_tokens, "best_us": round(p.best_s * 1e6, 2),
            "heuristic_us": round(p.heuristic_s * 1e6, 2), "timed": p.timed, "candidates": len(p.candidates),
            "complete": p.status == "tuned",
        }  # fmt: skip
        if tuple(scenarios) != ("random",):
            measured[p.table_key]["scenarios"] = list(scenarios)
        in_use_s = _time_of(p, p.in_use)
        if in_use_s is not None:
            measured[p.table_key]["in_use_us"] = round(in_use_s * 1e6, 2)
    return configs, measured


def tune_model(model: str, token_counts: list[int], dtype: torch.dtype, verbose: bool = True) -> dict[str, dict]:
    """Best config per shape key for ``model`` on the current GPU (no warm-up, no budget): {key: config dict}."""
    points = plan_points(group_shapes([model]), token_counts, dtype)
    tune_group(points, dtype, Budget(None), len(points), log=print if verbose else lambda *a: None)
    return _results(points)[0]


# ------------------------------------------------------------------------------------------------- CLI
def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="search fused-MoE kernel configs on this GPU, write tuning tables")
    parser.add_argument("--model", nargs="+", default=[], help='preset names, config.json paths, or "all"')
    parser.add_argument("--models-from", default=None, help="file with one model per line (# comments)")
    parser.add_argument("--num-tokens", nargs="+", type=int, default=TOKEN_COUNTS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--write", action="store_true", help="merge the results into this device's package table")
    parser.add_argument("--out", "--output", dest="output", default=None, help="merge into this table file instead")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock limit of the whole search")
    parser.add_argument("--workers", type=int, default=min(16, _usable_cpus()), help="warm-up processes (0: none)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (shapes, points, compiles) and stop")
    parser.add_argument(
        "--variants", nargs="+", default=None, metavar="FIELD=VALUE[,...]",
        help="time only the heuristic, each point's table entry and these changes of it (e.g. split_tail=1 "
        "split_tail=1,persistent=0), instead of the whole candidate list",
    )  # fmt: skip
    parser.add_argument(
        "--scenarios", nargs="+", choices=TUNE_SCENARIOS, default=["random"],
        help="routings whose times are summed into each candidate's time (imbalanced: factor 3.0, as the bench's "
        "issue-4 runs); default random",
    )  # fmt: skip
    parser.add_argument(
        "--rematch-rest", type=float, default=REMATCH_REST, metavar="R",
        help=f"in the rematch, leave the GPU idle R times each replay's length after it (duty cycle 1 / (1 + R)); "
        f"default {REMATCH_REST:g}; 0 replays back to back. Why: the bench runs each implementation in chunks "
        "between the others', and on an H100 the power cap slows a kernel run back to back (session 29, mixtral-8x7b "
        "T=1024: the 128-row entry 3134 us back to back, 2707 us resting, the bench's 2764; a 64-row config won "
        "back to back, 0.965x, and lost resting, 1.049x, as it loses in the bench)",
    )  # fmt: skip
    parser.add_argument(
        "--screen-rest", type=float, default=SCREEN_REST, metavar="R",
        help=f"in the screening too, leave the GPU idle R times each replay's length after it; default "
        f"{SCREEN_REST:g} (back to back). The screening then ranks the candidates at the bench's duty cycle, as the "
        "rematch does, at 1 + R times its time per candidate",
    )  # fmt: skip
    parser.add_argument(
        "--rematch-top", type=int, default=REMATCH_TOP, metavar="N",
        help=f"the rematch times again the screening's N fastest (with the heuristic and the config in use); default "
        f"{REMATCH_TOP}. The screening runs back to back, so at compute-bound points it may rank a config that wins "
        "resting below the third",
    )  # fmt: skip
    parser.set_defaults(run=run)


def parse_variant(text: str) -> dict[str, int]:
    """'split_tail=1,persistent=0' -> {'split_tail': 1, 'persistent': 0}; KernelConfig fields, int values.

    Raises ValueError naming the bad item.
    """
    fields = set(KernelConfig.__dataclass_fields__)
    changes = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in fields:
            raise ValueError(f"--variants: expected FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        try:
            changes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--variants: expected an int value in {item!r}") from None
    return changes


def use_variant_candidates(points: list[TunePoint], variants: list[dict[str, int]], paths: list[Path]) -> None:
    """Each point's candidates become: the heuristic, its table entry (the first of ``paths`` that has one, or the
    entry tuned nearest to its T as ``pick_config`` takes it, else the heuristic) and that entry with each of
    ``variants`` applied; a change the entry cannot take (KernelConfig refuses it) or that leaves it unchanged is
    dropped. The entry is also taken as the point's config in use (what ``pick_config`` runs, unless ``--output``
    names another table or an fp16 / grouped-GEMM fallback stands in), so the rematch times it again beside the
    fastest changes (``rematch_candidates``; without it, a change timed 0.97x in the screening was written over an
    entry that the rematch, on another clock, never timed: session 13's mixtral-8x7b T = 2048 / 4096)."""
    entries: dict[str, KernelConfig] = {}
    for path in reversed(list(dict.fromkeys(paths))):  # the first path wins
        entries.update(table_entries(path))
    for p in points:
        heuristic = p.candidates[0]
        entry = table_entry(entries, p.table_key, p.num_tokens) or heuristic
        changed = []
        for changes in variants:
            try:
                changed.append(dataclasses.replace(entry, **changes))
            except ValueError:
                continue
        p.candidates = list(dict.fromkeys([heuristic, entry, *changed]))
        p.entry = p.in_use = entry


def add_table_candidates(points: list[TunePoint], paths: list[Path]) -> int:
    """Put each point's entry in the table files ``paths`` (those that exist) second in its candidates, so a
    re-tune never writes a config slower than the one in use: the entry of its bucket, or the one tuned nearest to
    its T that ``pick_config`` uses while its bucket has none (``tilemoe.tuning.table_entry``). Returns how many were
    added."""
    added = 0
    for path in dict.fromkeys(paths):
        current = table_entries(path)
        for p in points:
            cfg = table_entry(current, p.table_key, p.num_tokens)  # the entry pick_config would use
            if cfg is not None and cfg not in p.candidates:
                p.candidates.insert(1, cfg)
                added += 1
    return added


def add_configs_in_use(points: list[TunePoint], dtype: torch.dtype, device_name: str) -> int:
    """Record in each point the config ``pick_config`` gives it on ``device_name`` before this run (the package
    table's entry for its bucket, or the one nearest to its T, or the grouped-GEMM rule, or the heuristic) and put it
    second among its candidates when it is not there yet, so the run measures what it replaces and never writes a
    slower config. Returns how many were added."""
    added = 0
    for p in points:
        p.in_use = pick_config(p.shape, dtype, device_name)
        if p.in_use not in p.candidates:
            p.candidates.insert(1, p.in_use)
            added += 1
    return added


def _time_of(p: TunePoint, cfg: KernelConfig | None) -> float | None:
    """Seconds of ``cfg`` at ``p``: from the rematch when it was in it (the fairer time), else from the screening."""
    return next((seconds for timed, seconds in (*p.rematch, *p.times) if timed == cfg), None)


def sibling_tables(device_name: str, table_dir: Path | None = None) -> list[Path]:
    """The package's tables of the other GPUs (sorted by name): their entry for a shape is a candidate worth timing
    here too (a config the tuner found on an H100 but could not reach on the H200 at mixtral T=16384, session 9)."""
    own = table_path(device_name)
    return [p for p in sorted((table_dir or TABLE_DIR).glob("*.json")) if p.name != own.name]


def table_entries(path: Path) -> dict[str, KernelConfig]:
    """The configs of the table file at ``path`` by shape key ({} when it does not exist); an entry written by
    another KernelConfig version (unknown or invalid fields) is left out."""
    if not path.exists():
        return {}
    entries = {}
    for key, value in json.loads(path.read_text()).get("configs", {}).items():
        with contextlib.suppress(TypeError, ValueError):
            entries[key] = KernelConfig.from_dict(value)
    return entries


def run(args) -> int:
    budget = Budget(args.budget_s)
    dtype = DTYPES[args.dtype]
    try:
        if not args.rematch_rest >= 0:  # also NaN
            raise ValueError(f"--rematch-rest: expected >= 0, got {args.rematch_rest}")
        if not args.screen_rest >= 0:  # also NaN
            raise ValueError(f"--screen-rest: expected >= 0, got {args.screen_rest}")
        if not args.rematch_top >= 1:
            raise ValueError(f"--rematch-top: expected >= 1, got {args.rematch_top}")
        variants = [parse_variant(v) for v in args.variants or []]
        scenarios = tuple(dict.fromkeys(args.scenarios))
        models = resolve_models(args.model, args.models_from)
        groups = group_shapes(models)
        points = plan_points(groups, args.num_tokens, dtype)
    except (ValueError, OSError) as error:
        print(f"tilemoe tune: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_plan(models, groups, points, warmup_tasks(points, dtype))
        for p in points:
            print(f"  {p.table_key} {'/'.join(p.group.models)}: {len(p.candidates)} candidates")
        if variants:  # the entries they change are in the GPU's table, which the run looks up on the device
            print(f"--variants: on the GPU each point times its heuristic, its table entry and {len(variants)} "
                  "change(s) of that entry instead of the candidates above")  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        print("tilemoe tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    path = Path(args.output) if args.output else table_path(name)
    writing = args.write or args.output is not None
    if variants:
        use_variant_candidates(points, variants, [path, table_path(name)])
    else:
        add_table_candidates(points, [*sibling_tables(name), table_path(name), path])  # the last added comes first
        add_configs_in_use(points, dtype, name)
    tasks = warmup_tasks(points, dtype)
    _print_plan(models, groups, points, tasks)
    if args.workers > 0:
        report = warm_up(tasks, args.workers, deadline=budget.at(WARMUP_SHARE))
        print(
            f"warm-up: {report.done}/{report.tasks} launches in {report.seconds:.0f} s on {report.workers} workers"
            f", {len(report.errors)} failed, {report.cancelled} cut by the budget",
            flush=True,
        )
        for error in report.errors[:10]:
            print(f"  warm-up error: {error}")
    misses = 0
    by_group: dict[int, list[TunePoint]] = {}
    for p in points:
        by_group.setdefault(id(p.group), []).append(p)
    left = len(points)
    for group_points in by_group.values():
        try:
            timing = dict(timer=screen_timer(args.screen_rest), rematch_rest=args.rematch_rest,
                          rematch_top=args.rematch_top)  # fmt: skip
            misses += tune_group(group_points, dtype, budget, left, scenarios=scenarios, **timing)
        except (RuntimeError, ValueError) as error:  # e.g. out of memory for the weights: the other shapes go on
            for p in group_points:
                if p.status == "pending":
                    p.status = "failed"
                    p.errors.append(f"{type(error).__name__}: {str(error)[:300]}")
            print(f"{'/'.join(group_points[0].group.models)}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        torch.cuda.empty_cache()  # the next shape's weights (up to 34 GB for Kimi-K2) need the room
        left -= len(group_points)
        configs, measured = _results(group_points, scenarios)
        if variants:  # what each change did, against the table entry (the second candidate)
            for p in group_points:
                print(_variant_lines(p), flush=True)
        if writing and configs:  # after each shape, so a run cut off from outside keeps what it found
            merge_table(path, name, configs, measured)
    _summary(points, budget, misses, path if writing else None)
    return 1 if any(p.status == "failed" for p in points) else 0


def _print_plan(models, groups, points, tasks) -> None:
    print(
        f"tune: {len(models)} models -> {len(groups)} shapes, {len(points)} points, "
        f"{sum(len(p.candidates) for p in points)} timings, {len(tasks)} warm-up launches",
        flush=True,
    )


def _summary(points: list[TunePoint], budget: Budget, misses: int, path: Path | None) -> None:
    count = {s: sum(p.status == s for p in points) for s in ("tuned", "cut", "skipped", "failed")}
    gains = [p.heuristic_s / p.best_s for p in points if p.best_s]
    print("== tune summary ==")
    print(
        f"{len(points)} points in {budget.clock() - budget.start:.0f} s: {count['tuned']} tuned, {count['cut']} cut "
        f"by the budget (best so far kept), {count['skipped']} not reached (table entry / heuristic kept), "
        f"{count['failed']} failed"
    )
    if gains:
        print(f"best vs heuristic: median {sorted(gains)[len(gains) // 2]:.2f}x, max {max(gains):.2f}x")
    if misses:
        print(
            f"{misses} first calls compiled in the timing loop (over {FIRST_CALL_MISS_S} s: the warm-up missed "
            "their specialization)"
        )
    for p in points:
        if p.status in ("skipped", "failed"):
            print(f"  {p.status}: {p.table_key} {'/'.join(p.group.models)} {'; '.join(p.errors)[:200]}")
    if path is not None:
        print(f"table: {path}")
