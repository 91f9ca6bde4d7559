"""tilemoe tune: plan (dedup, candidates, pruning), warm-up (specialization match, partitioning, worker path),
budget cut-off, table merge; one end-to-end run on the GPU."""

import argparse
import dataclasses
import json
import time

import pytest
import torch

import tilemoe.tune_cli as tune
import tilemoe.tuning as tuning
from tilemoe.cli import main
from tilemoe.config import MoEConfig
from tilemoe.tuning import KernelConfig, MoEShape, heuristic_config, pick_config, shape_key


def _config(**changes) -> MoEConfig:
    base = dict(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    return MoEConfig(**{**base, **changes})


# ------------------------------------------------------------------------------------------------- plan
def test_group_shapes_dedups_kernel_shapes():
    configs = {
        "a": _config(),
        "b": _config(name="b"),  # same kernel shape as "a": tuned once
        "c": _config(activation="gelu"),  # same E/K/H/I but another kernel: its own group
        "d": _config(num_experts=16),
    }
    groups = tune.group_shapes(["a", "b", "c", "d", "a"], configs)
    assert [g.models for g in groups] == [["a", "b"], ["c"], ["d"]]


def test_plan_points_one_per_table_key():
    configs = {"a": _config(), "c": _config(activation="gelu"), "d": _config(num_experts=16)}
    logged = []
    groups = tune.group_shapes(["a", "c", "d"], configs)
    # 100 and 128 share the T128 bucket; "c" shares every key of "a" (the key has no activation)
    points = tune.plan_points(groups, [128, 1, 100, 8], torch.bfloat16, log=logged.append)
    keys = [p.table_key for p in points]
    assert len(keys) == len(set(keys)) == 6
    assert [(p.group.models, p.num_tokens) for p in points] == [
        (["a"], 1), (["a"], 8), (["a"], 100), (["d"], 1), (["d"], 8), (["d"], 100),
    ]  # fmt: skip
    assert len(logged) == 1 and all("shares table key" in line for line in logged)
    with pytest.raises(ValueError, match="num_tokens"):
        tune.plan_points(groups, [0, 8], torch.bfloat16)


def test_resolve_models(tmp_path):
    listed = tmp_path / "models.txt"
    listed.write_text("# chosen\nmixtral-8x7b\n\nqwen3-30b-a3b  # trailing comment\n")
    assert tune.resolve_models(["olmoe-1b-7b"], str(listed)) == ["olmoe-1b-7b", "mixtral-8x7b", "qwen3-30b-a3b"]
    everything = tune.resolve_models(["all", "mixtral-8x7b"])
    assert len(everything) == len(set(everything)) == 17 and "kimi-k2" in everything
    with pytest.raises(ValueError, match="models"):
        tune.resolve_models([])


@pytest.mark.parametrize(
    "shape",
    [
        MoEShape(1, 128, 8, 2048, 768),  # decode, many experts: only 16-row tiles survive
        MoEShape(64, 8, 2, 4096, 14336),  # few large experts, 16 rows each
        MoEShape(16384, 128, 8, 2048, 768),  # 1024 rows per expert: no small tiles
        MoEShape(16384, 8, 2, 4096, 14336),  # 4096 rows per expert: 128-row tiles still tried (the cap)
    ],
)
def test_candidate_configs(shape):
    cands = tune.candidate_configs(shape, torch.bfloat16)
    assert cands[0] == heuristic_config(shape, torch.bfloat16)
    assert len(cands) == len(set(cands)) >= 2
    rows = shape.num_tokens * shape.top_k / shape.num_experts
    smallest = min(rows / 16, tune.MIN_BLOCK_M_CAP)
    for cfg in cands[1:]:
        if not cfg.grouped_mm:  # the grouped GEMM's block_m is its row alignment, not a tile
            assert smallest <= cfg.block_m <= max(16, 4 * rows)
    # above EXPERT_GROUPS_ABOVE_ROWS rows per expert the 128-row tiles run expert by expert, 16 blocks at a time
    by_expert = rows > tune.EXPERT_GROUPS_ABOVE_ROWS
    as_tried = tune._expert_grouped if by_expert else (lambda c: c)
    for cfg in cands[1:]:
        if cfg.block_m >= 128 and not cfg.grouped_mm:
            assert cfg.expert_groups == by_expert and (not by_expert or cfg.group_m1 == cfg.group_m2 == 16)
    pruned = [c for c in tune.CANDIDATES if as_tried(c) not in cands]
    assert all(not smallest <= c.block_m <= max(16, 4 * rows) for c in pruned if as_tried(c) != cands[0])
    if rows >= 1024:  # the 128-row dense GEMM 1 forms (the H100's mixtral T=16384 winner among them) are timed
        assert all(as_tried(c) in cands for c in tune.DENSE_GEMM1_CANDIDATES if c.block_m == 128)


def test_grouped_mm_candidate_where_its_grouped_gemm_runs(monkeypatch):
    monkeypatch.setattr(tune, "grouped_mm_available", lambda device_type, dtype: True)
    many_rows = MoEShape(4096, 8, 2, 4096, 14336)  # 1024 rows per expert
    assert tune.GROUPED_MM_CANDIDATE in tune.candidate_configs(many_rows, torch.bfloat16)
    assert tune.GROUPED_MM_CANDIDATE not in tune.candidate_configs(many_rows, torch.float32)
    assert tune.GROUPED_MM_CANDIDATE not in tune.candidate_configs(MoEShape(64, 8, 2, 4096, 14336), torch.bfloat16)
    monkeypatch.setattr(tune, "grouped_mm_available", lambda device_type, dtype: False)
    assert tune.GROUPED_MM_CANDIDATE not in tune.candidate_configs(many_rows, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ warm-up
def _triton_int_key(value: int):
    """Triton's own specialization of an int argument (3.6+: native_specialize_impl)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    return libtriton.native_specialize_impl(BaseBackend, value, False, True, True)


@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("num_experts", [8, 60, 128, 384])
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_warmup_size_matches_triton_specialization(top_k, num_experts, block_m):
    cfg = KernelConfig(block_m=block_m)
    for t in tune.TOKEN_COUNTS:
        size = tune.warmup_size(t, top_k, num_experts, cfg)
        assert size is not None, t
        t_w, e_w = size
        assert t_w <= tune.WARMUP_MAX_TOKENS and e_w <= min(num_experts, tune.WARMUP_MAX_EXPERTS)
        real = tune.launch_ints(t, top_k, num_experts, cfg)
        warm = tune.launch_ints(t_w, top_k, e_w, cfg)
        assert len(real) == 3
        assert [_triton_int_key(v) for v in warm] == [_triton_int_key(v) for v in real], (t, size, real, warm)


@pytest.mark.skipif("decode" not in KernelConfig.__dataclass_fields__, reason="KernelConfig has no decode field")
def test_warmup_size_decode_any_tokens():
    cfg = KernelConfig(decode=True)
    assert tune.launch_ints(4096, 8, 128, cfg) == ()
    assert tune.warmup_size(4096, 8, 128, cfg) == (1, 1)


def _record_launches(monkeypatch) -> list:
    """Every Triton launch in the interpreter as (kernel name, {argument: value}, constexpr names)."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    launches, real_run = [], InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters.values()
        const = {p.name for p in params if "constexpr" in str(p.annotation)}
        launches.append((self.__name__, dict(kwargs), const))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


@pytest.mark.skipif(not tune.os.environ.get("TRITON_INTERPRET"), reason="records launches in the interpreter")
@pytest.mark.parametrize("num_tokens", [1, 8, 64])  # 64: 16 row blocks of 16, the divisible-by-16 case
@pytest.mark.parametrize("block_m", [16, 32])
def test_warm_launch_specializes_like_the_real_launch(monkeypatch, num_tokens, block_m):
    """The launches of ``fused_experts`` itself (not launch_ints' mirror of them): every kernel of the warm-up
    launch gets the same constexprs and the same Triton int specialization as the real one; the alignment
    kernel (which sees E) matches through the align task. Fails when the launcher gains a T/E-dependent int
    that ``launch_ints`` does not list."""
    from tilemoe.ops.fused_experts import fused_experts
    from tilemoe.testing import make_routing

    config = _config(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    cfg = KernelConfig(block_m=block_m, block_n1=16, block_k1=16, block_n2=16, block_k2=16)
    launches = _record_launches(monkeypatch)
    tw, ti = make_routing(num_tokens, config)
    x = torch.randn(num_tokens, 32)
    w13, w2 = torch.randn(8, 32, 32), torch.randn(8, 32, 16)
    fused_experts(x, w13, w2, tw, ti, config=config, kernel_config=cfg)
    real = list(launches)
    t_w, e_w = tune.warmup_size(num_tokens, 2, 8, cfg)
    launches.clear()
    tune.run_warm_task(tune.WarmTask(config, "fp32", t_w, cfg, num_experts=e_w), "cpu")
    warm = list(launches)
    launches.clear()
    tune.run_warm_task(tune.WarmTask(config, "fp32", num_tokens, cfg, align_only=True, num_experts=8), "cpu")
    align = list(launches)

    def key(launch):
        name, kwargs, const = launch
        spec = {}
        for arg, value in kwargs.items():
            if arg in const or isinstance(value, (bool, float)):
                spec[arg] = value
            elif isinstance(value, int):
                spec[arg] = _triton_int_key(value)
        return name, spec

    aligned = [launch for launch in real if "align" in launch[0]]
    assert [key(launch) for launch in aligned] == [key(launch) for launch in align]
    others = [key(launch) for launch in real if "align" not in launch[0]]
    assert others and others == [key(launch) for launch in warm if "align" not in launch[0]]


def test_warmup_tasks_cover_every_candidate_once():
    groups = tune.group_shapes(["a", "d"], {"a": _config(), "d": _config(num_experts=16, top_k=4)})
    points = tune.plan_points(groups, [1, 8, 64, 4096], torch.float16)
    tasks = tune.warmup_tasks(points, torch.float16)
    gemm = {(t.config.num_experts, t.kernel_config, (t.num_tokens, t.num_experts)) for t in tasks if not t.align_only}
    assert len(gemm) == sum(not t.align_only for t in tasks)  # no launch twice
    for p in points:
        c = p.group.config
        for cfg in p.candidates:
            assert (c.num_experts, cfg, tune.warmup_size(p.num_tokens, c.top_k, c.num_experts, cfg)) in gemm
    aligns = [t for t in tasks if t.align_only]
    assert all(t.num_experts == t.config.num_experts for t in aligns)
    assert all(t.num_tokens * t.config.top_k <= tune.ONE_PROGRAM_MAX_SLOTS for t in aligns)
    assert {t.dtype for t in tasks} == {"fp16"}


@pytest.mark.parametrize("num_items", [0, 1, 5, 37, 200])
@pytest.mark.parametrize("num_workers", [1, 3, 16])
def test_partition(num_items, num_workers):
    items = list(range(num_items))
    chunks = tune.partition(items, num_workers, chunks_per_worker=4)
    assert [i for chunk in chunks for i in chunk] == items  # every item once, in order
    assert len(chunks) == min(num_items, num_workers * 4)
    if chunks:
        sizes = [len(c) for c in chunks]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_partition_bad_workers():
    with pytest.raises(ValueError, match="num_workers"):
        tune.partition([1, 2], 0)


def _tiny_tasks(n: int) -> list:
    config = _config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16)
    tasks = [tune.WarmTask(config, "fp32", t, cfg, num_experts=1 + t % 2) for t in range(1, n + 1)]
    return tasks + [tune.WarmTask(config, "fp32", 3, cfg, align_only=True, num_experts=4)]


def test_warm_chunk_runs_tasks_and_reports_errors(monkeypatch):
    tasks = _tiny_tasks(2)
    assert tune.warm_chunk(tasks) == [None, None, None]
    real = tune.run_warm_task

    def flaky(task, device):
        if task.num_tokens == 2 and not task.align_only:
            raise RuntimeError("out of shared memory")
        real(task, device)

    monkeypatch.setattr(tune, "run_warm_task", flaky)
    results = tune.warm_chunk(tasks)
    assert results[0] is None and results[2] is None
    assert "RuntimeError: out of shared memory" in results[1]


def test_warm_up_spawned_workers():
    tasks = _tiny_tasks(3)
    report = tune.warm_up(tasks, num_workers=2)
    assert (report.tasks, report.done, report.cancelled, report.errors, report.workers) == (4, 4, 0, [], 2)


def test_warm_up_deadline_cancels_the_rest():
    tasks = _tiny_tasks(30)
    report = tune.warm_up(tasks, num_workers=1, deadline=time.monotonic())
    # chunks already handed to the (still starting) worker run; the others are cancelled
    assert report.done + report.cancelled == report.tasks == 31
    assert report.cancelled > 0 and report.errors == []


def _hanging_chunk(tasks):
    time.sleep(300)  # a compile that never returns


def test_warm_up_kills_a_hung_worker():
    start = time.monotonic()
    report = tune.warm_up(_tiny_tasks(1), num_workers=1, deadline=start + 1, grace_s=1, chunk_fn=_hanging_chunk)
    lost = sum(int(e.split()[0]) for e in report.errors if "tasks lost" in e)
    assert report.done == 0 and report.tasks == 2 and lost >= 1 and report.cancelled + lost == 2
    assert "workers killed after 1 s past the deadline" in report.errors
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------------------- budget
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _points(n_points: int, n_cands: int) -> list:
    group = tune.ShapeGroup(("k",), _config(), ["m"])
    cands = [KernelConfig(block_m=16 << (i % 4), num_warps1=1 + i) for i in range(n_cands)]
    return [tune.TunePoint(group, t + 1, f"key{t}", list(cands)) for t in range(n_points)]


def test_rematch_times_the_heuristic_and_the_config_in_use_again():
    # the screening's fastest three, plus the heuristic (slowest here) and the config in use (fifth), once each
    (point,) = _points(1, 6)
    point.times = [(cfg, 1.0 - 0.1 * i) for i, cfg in enumerate(point.candidates)]  # candidate 5 fastest
    point.in_use = point.candidates[1]
    top = [cfg for cfg, _ in tune.rematch_candidates(point)]
    assert top == [point.candidates[5], point.candidates[4], point.candidates[3], point.candidates[0],
                   point.candidates[1]]  # fmt: skip
    point.in_use = point.candidates[4]  # already among the fastest: not twice
    assert len(tune.rematch_candidates(point)) == 4
    point.in_use = KernelConfig(block_m=128)  # never timed (it failed, or the budget ran out): not rematched
    assert len(tune.rematch_candidates(point)) == 4
    point.in_use = None
    # --rematch-top 5: the fastest five, then the heuristic; --rematch-top 1: the fastest and the heuristic
    assert [cfg for cfg, _ in tune.rematch_candidates(point, 5)] == point.candidates[5:0:-1] + [point.candidates[0]]
    assert [cfg for cfg, _ in tune.rematch_candidates(point, 1)] == [point.candidates[5], point.candidates[0]]


def test_rematch_winner_keeps_the_config_in_use_within_the_noise():
    fast, in_use, other = KernelConfig(block_m=64), KernelConfig(block_m=128), KernelConfig(block_m=32)
    gain = tune.REPLACE_MIN_GAIN
    # the config in use within the margin of the fastest: kept, with its own time
    assert tune.rematch_winner([(fast, 1.0), (in_use, 1.0 + gain / 2), (other, 2.0)], in_use) == (in_use, 1 + gain / 2)
    # past the margin: the fastest replaces it
    assert tune.rematch_winner([(fast, 1.0), (in_use, 1.0 + 2 * gain)], in_use) == (fast, 1.0)
    # no config in use, or one not in the rematch: the fastest
    assert tune.rematch_winner([(other, 1.5), (fast, 1.0)], None) == (fast, 1.0)
    assert tune.rematch_winner([(other, 1.5), (fast, 1.0)], in_use) == (fast, 1.0)
    # the config in use the fastest: itself
    assert tune.rematch_winner([(fast, 1.0), (in_use, 0.9)], in_use) == (in_use, 0.9)


def test_search_point_keeps_best_and_errors():
    clock = _Clock()
    (point,) = _points(1, 4)
    secs = {point.candidates[0]: 3.0, point.candidates[1]: 2.0, point.candidates[3]: 2.5}

    def measure(cfg):
        clock.now += 1
        if cfg not in secs:
            raise ValueError("relative error 1.0e+00 > 2e-02")
        return secs[cfg]

    tune.search_point(point, measure, tune.Budget(None, clock), slice_s=100)
    assert point.status == "tuned" and point.timed == 3
    assert (point.best, point.best_s, point.heuristic_s) == (point.candidates[1], 2.0, 3.0)
    assert len(point.errors) == 1 and "relative error" in point.errors[0]


def test_search_point_heuristic_failure():
    (point,) = _points(1, 3)

    def measure(cfg):
        raise RuntimeError("boom")

    tune.search_point(point, measure, tune.Budget(None), slice_s=100)
    assert point.status == "failed" and point.best is None and point.timed == 0


def test_budget_cut_off():
    clock = _Clock()
    budget = tune.Budget(10.0, clock)
    points = _points(4, 5)
    points[0].candidates = points[0].candidates[:2]
    timed = []

    def measure_for(point):
        def measure(cfg):
            timed.append((point.table_key, cfg))
            clock.now += 1.0
            return 100.0 - len(timed)  # later candidates faster: best = last timed

        return measure

    lines = []
    tune.search_points(points, measure_for, budget, points_left=4, log=lines.append)
    # 1 s per candidate; slices 1.5 x (left / points left): 3.75 s (2 candidates: done at 2 s), 4 s (5 timed by
    # 7 s), 2.25 s (3 timed, then the budget is out at 10 s), then nothing left for the 4th point
    assert [p.status for p in points] == ["tuned", "tuned", "cut", "skipped"]
    assert [p.timed for p in points] == [2, 5, 3, 0] and clock.now == 10.0
    for p in points:
        if p.status == "skipped":
            assert p.best is None and p.timed == 0
        else:
            assert p.heuristic_s is not None and p.best == p.candidates[p.timed - 1]
    assert any("budget: best so far" in line for line in lines)
    configs, measured = tune._results(points)
    assert set(configs) == {p.table_key for p in points if p.status != "skipped"}
    assert all(measured[p.table_key]["complete"] == (p.status == "tuned") for p in points if p.best)


def _wall_timer(fn, num_tokens):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_tune_group_on_cpu_checks_every_candidate(monkeypatch):
    """The timing loop in the interpreter (fp32: interpreter dots are exact there): every candidate's output is
    checked against the reference; a wrong one is reported and never picked."""
    import tilemoe.ops.fused_experts as fe

    small = [KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_warps1=w) for w in (1, 2)]
    monkeypatch.setattr(tune, "CANDIDATES", small)
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [])
    real = fe.fused_experts

    def wrong_for_two_warps(*args, kernel_config, **kwargs):
        out = real(*args, kernel_config=kernel_config, **kwargs)
        return out * 1.5 if kernel_config.num_warps1 == 2 else out

    monkeypatch.setattr(fe, "fused_experts", wrong_for_two_warps)
    config = _config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    points = tune.plan_points(tune.group_shapes(["tiny"], {"tiny": config}), [3, 8], torch.float32)
    lines = []
    tune.tune_group(points, torch.float32, tune.Budget(None), 2, log=lines.append, device="cpu", timer=_wall_timer)
    for p in points:
        assert p.status == "tuned" and p.candidates[0] == heuristic_config(p.shape, torch.float32)
        assert p.candidates[1:] == small and p.timed == 2
        assert p.best.num_warps1 != 2 and p.best_s > 0 and p.heuristic_s > 0
        assert len(p.errors) == 1 and "relative error" in p.errors[0]
    assert len(lines) == 2 and "candidates failed" in lines[0]


def test_tune_group_sums_the_scenarios(monkeypatch):
    """--scenarios random imbalanced: each candidate runs (checked) and is timed on both routings; its time is the sum;
    the table's measured entry names the scenarios."""
    import tilemoe.ops.fused_experts as fe

    small = [KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16)]
    monkeypatch.setattr(tune, "CANDIDATES", small)
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [])
    real, routings = fe.fused_experts, []

    def recording(*args, **kwargs):
        routings.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(fe, "fused_experts", recording)
    config = _config(num_experts=6, top_k=2, hidden_size=32, intermediate_size=16)
    points = tune.plan_points(tune.group_shapes(["tiny"], {"tiny": config}), [40], torch.float32)
    timer_calls = []

    def timer(fn, num_tokens):
        timer_calls.append(fn)
        return 1e-3 * len(timer_calls)

    scenarios = ("random", "imbalanced")
    tune.tune_group(points, torch.float32, tune.Budget(None), 1, log=lambda *a: None, device="cpu", timer=timer,
                    scenarios=scenarios)  # fmt: skip
    (p,) = points
    assert p.status == "tuned" and p.timed == len(p.candidates) == 2 and not p.errors
    assert len(timer_calls) == 4  # 2 candidates x 2 routings
    assert p.heuristic_s == pytest.approx(1e-3 + 2e-3) and p.best_s == p.heuristic_s  # sums: 3 ms, then 7 ms
    ids = {id(r) for r in routings}
    assert len(ids) == 2 and not torch.equal(routings[0], routings[1])  # two routings, each reused per candidate
    counts = torch.bincount(routings[1].flatten().long(), minlength=6)
    assert counts.max() > 1.5 * counts.float().mean()  # the second is the imbalanced one
    _, measured = tune._results(points, scenarios)
    assert measured[p.table_key]["scenarios"] == ["random", "imbalanced"]
    assert "scenarios" not in tune._results(points)[1][p.table_key]


def test_a_candidate_triton_lowered_is_written_as_it_ran(monkeypatch):
    """A candidate asking for more stages than the GPU's shared memory holds runs, through launch_fitting, at fewer:
    the table gets the stages it ran at (what was timed), the point's line says so, and against the config in use
    that config counts as kept when that is what it ran as (session 11: five 5-stage entries that ran at 4)."""
    import tilemoe.ops._kernels._fused_experts as kernels
    from tilemoe.ops import _launch

    class TwoStagesFit:  # as the GEMM 2 kernel on a GPU that holds 2 of its stages
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(**kwargs):
                from triton.runtime.errors import OutOfResources

                if kwargs["num_stages"] > 2:
                    raise OutOfResources(3 * 65536, 2 * 65536, "shared memory")
                self.real[grid](**kwargs)

            return launch

    monkeypatch.setattr(_launch, "_FITTED_STAGES", {})
    monkeypatch.setattr(kernels, "_gemm2_kernel", TwoStagesFit(kernels._gemm2_kernel))
    base = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages2=2)
    deep = dataclasses.replace(base, num_stages2=4)
    monkeypatch.setattr(tune, "CANDIDATES", [deep])
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [])
    config = _config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    (point,) = tune.plan_points(tune.group_shapes(["tiny"], {"tiny": config}), [8], torch.float32)
    point.in_use = base
    times = iter([2e-3, 1e-3])  # the heuristic, then the deep candidate wins
    tune.tune_group([point], torch.float32, tune.Budget(None), 1, log=lambda *a: None, device="cpu",
                    timer=lambda fn, t: next(times))  # fmt: skip
    assert point.best == deep and point.runs_as(deep) == base
    heuristic = point.candidates[0]
    assert heuristic.num_stages2 > 2 and point.runs_as(heuristic) == dataclasses.replace(heuristic, num_stages2=2)
    configs, _ = tune._results([point])
    assert configs[point.table_key] == base.to_dict()
    line = tune._point_line(point)
    assert "[ran as num_stages1=3, num_stages2=2]" in line and "[the config in use: kept]" in line


def test_tune_group_gives_the_rematch_its_rest(monkeypatch):
    """tune_group(rematch_rest=R) reaches each point's measure (the rematch itself runs on a GPU only)."""
    small = [KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16)]
    monkeypatch.setattr(tune, "CANDIDATES", small)
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [])
    measures = []

    class Recording(tune._Measure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            measures.append(self)

    monkeypatch.setattr(tune, "_Measure", Recording)
    config = _config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    points = tune.plan_points(tune.group_shapes(["tiny"], {"tiny": config}), [12], torch.float32)
    tune.tune_group(points, torch.float32, tune.Budget(None), 1, log=lambda *a: None, device="cpu",
                    timer=lambda fn, t: 1e-3, rematch_rest=3.0, rematch_top=5)  # fmt: skip
    assert [(m.rematch_rest, m.rematch_top) for m in measures] == [(3.0, 5)]


@pytest.mark.parametrize(
    "flag, default, good, bad, message",
    [
        ("--rematch-rest", 4.0, "3", "-0.5", "expected >= 0, got -0.5"),  # rests unless told otherwise
        ("--screen-rest", 0.0, "4", "nan", "expected >= 0, got nan"),  # back to back unless told otherwise
        ("--rematch-top", 3, "6", "0", "expected >= 1, got 0"),
    ],
)
def test_rematch_and_screening_options(capsys, flag, default, good, bad, message):
    argv = ["tune", "--model", "mixtral-8x7b", "--num-tokens", "1024", "--dry-run"]
    parser = argparse.ArgumentParser()
    tune.add_parser(parser.add_subparsers())
    name = flag[2:].replace("-", "_")
    assert getattr(parser.parse_args(argv), name) == getattr(tune, name.upper()) == default
    assert main([*argv, flag, good]) == 0
    assert main([*argv, flag, bad]) == 2
    assert f"{flag}: {message}" in capsys.readouterr().err


def test_screen_timer_rests_its_replays(monkeypatch):
    """screen_timer(R) times by graph replays that rest R (graph_us_in_turn's rest); the default does not rest."""
    import tilemoe.bench.timing as timing

    seen = []
    monkeypatch.setattr(tune, "events_seconds", lambda fn, reps: 1e-3)  # 3 calls a graph, 10 replays
    monkeypatch.setattr(timing, "capture_graph", lambda fn, calls: (_FakeGraph(), None))
    monkeypatch.setattr(
        timing, "graph_us_in_turn", lambda graphs, rounds, rest=0.0: seen.append((rounds, rest)) or [7.0]
    )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert tune.screen_timer(4.0)(lambda: None, 1024) == pytest.approx(7e-6)
    assert tune.time_call(lambda: None, 1024) == pytest.approx(7e-6)
    assert seen == [(10, 4.0), (10, 0.0)]


class _FakeGraph:
    def replay(self):
        pass


def test_scenarios_option(capsys):
    argv = ["tune", "--model", "mixtral-8x7b", "--num-tokens", "256", "--dry-run"]
    assert main([*argv, "--scenarios", "random", "imbalanced"]) == 0
    with pytest.raises(SystemExit):
        main([*argv, "--scenarios", "zipf"])
    assert "invalid choice" in capsys.readouterr().err


def test_point_slice_lets_late_points_borrow():
    clock = _Clock()
    budget = tune.Budget(100.0, clock)
    assert tune.point_slice(budget, 10) == pytest.approx(15.0)
    clock.now = 90.0
    assert tune.point_slice(budget, 1) == pytest.approx(15.0)
    assert tune.point_slice(tune.Budget(None), 3) == float("inf")
    assert tune.Budget(100.0, clock).at(0.5) == pytest.approx(140.0)


# ------------------------------------------------------------------------------------------------- table
def test_merge_table_keeps_other_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning._load_table.cache_clear()
    path = tuning.table_path("Test GPU 7")
    shape = MoEShape(64, 8, 2, 4096, 14336)
    key = tuning.shape_key(shape, torch.bfloat16)
    old = KernelConfig(block_m=32)
    path.write_text(json.dumps({"device": "Test GPU 7", "configs": {"other": old.to_dict(), key: old.to_dict()}}))
    new = KernelConfig(block_m=64, block_n1=128)
    data = tune.merge_table(path, "Test GPU 7", {key: new.to_dict()}, {key: {"best_us": 1.0}})
    on_disk = json.loads(path.read_text())
    assert on_disk == data
    assert on_disk["configs"] == {"other": old.to_dict(), key: new.to_dict()}
    assert on_disk["measured"] == {key: {"best_us": 1.0}}
    assert on_disk["device"] == "Test GPU 7" and on_disk["torch"] == torch.__version__
    assert on_disk["triton"] and on_disk["date"].endswith("+00:00")
    try:
        assert pick_config(shape, torch.bfloat16, "Test GPU 7") == new
    finally:
        tuning._load_table.cache_clear()
    with pytest.raises(ValueError, match="device"):
        tune.merge_table(path, "Other GPU", {key: new.to_dict()})
    fresh = tmp_path / "sub" / "fresh.json"
    assert tune.merge_table(fresh, "Test GPU 7", {key: new.to_dict()})["configs"] == {key: new.to_dict()}


def test_add_table_candidates(tmp_path):
    points = _points(2, 3)
    current = KernelConfig(block_m=128, block_n1=256)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"configs": {"key0": current.to_dict(), "key1": {"block_mm": 3}}}))
    assert tune.add_table_candidates(points, [path, tmp_path / "missing.json", path]) == 1
    assert points[0].candidates[1] == current and len(points[0].candidates) == 4
    assert len(points[1].candidates) == 3  # an entry of another KernelConfig version is ignored


def test_table_candidates_at_an_untuned_bucket_are_the_entry_in_use(tmp_path):
    """Tuning T = 8192 where the table has only 4096 and 16384: pick_config runs the 4096 entry there (the nearest,
    ties to the smaller), so that is the incumbent a re-tune must beat, and what --variants changes."""
    groups = tune.group_shapes(["qwen3-30b-a3b"])
    (point,) = tune.plan_points(groups, [8192], torch.bfloat16, log=lambda *_: None)
    c = groups[0].config
    used = KernelConfig(block_m=128, block_n1=128, split_tail=True)
    other = KernelConfig(block_m=128, block_n1=256, gate_up_dot=True, tma=True)
    key = {t: shape_key(MoEShape(t, c.num_experts, c.top_k, c.hidden_size, c.intermediate_size), torch.bfloat16)
           for t in (4096, 16384)}  # fmt: skip
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"configs": {key[4096]: used.to_dict(), key[16384]: other.to_dict()}}))
    heuristic = point.candidates[0]
    assert tune.add_table_candidates([point], [path]) == 1 and point.candidates[1] == used
    tune.use_variant_candidates([point], [{"persistent": 1}], [path])
    assert point.entry == used
    assert point.candidates == [heuristic, used, dataclasses.replace(used, persistent=True)]


def test_config_in_use_is_timed_and_reported(tmp_path, monkeypatch):
    """The run records what pick_config ran at each point before it (here the T=4096 entry standing in at T=8192),
    times it, and says what the new best gains on it; where the table has nothing, the heuristic is the one in use."""
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning._load_table.cache_clear()
    try:
        groups = tune.group_shapes(["qwen3-30b-a3b"])
        points = tune.plan_points(groups, [8192, 64], torch.bfloat16, log=lambda *_: None)
        c = groups[0].config
        used = KernelConfig(block_m=128, block_n1=128, block_n2=64, split_tail=True)
        key = shape_key(MoEShape(4096, c.num_experts, c.top_k, c.hidden_size, c.intermediate_size), torch.bfloat16)
        table = {"device": "Test GPU 7", "configs": {key: used.to_dict()}}
        tuning.table_path("Test GPU 7").write_text(json.dumps(table))
        assert tune.add_configs_in_use(points, torch.bfloat16, "Test GPU 7") == 1
        at_8192, at_64 = sorted(points, key=lambda p: -p.num_tokens)
        assert at_8192.in_use == used and at_8192.candidates[1] == used
        assert at_64.in_use == at_64.candidates[0]  # the heuristic, already first: nothing added
    finally:
        tuning._load_table.cache_clear()
    heuristic, best = at_8192.candidates[0], at_8192.candidates[2]
    secs = {heuristic: 3.0, used: 2.5, best: 2.0}
    tune.search_point(at_8192, lambda cfg: secs.get(cfg, 4.0), tune.Budget(None), float("inf"))
    assert at_8192.best == best
    assert "[the config in use: 2500000.0 us, 1.25x]" in tune._point_line(at_8192)
    at_8192.rematch = [(best, 1.9), (used, 2.66)]  # the rematch's time wins over the screening's
    at_8192.best_s = 1.9  # as Measure.rematch sets it
    assert "1.40x" in tune._point_line(at_8192)
    configs, measured = tune._results([at_8192])
    assert measured[at_8192.table_key]["in_use_us"] == 2.66e6
    tune.search_point(at_64, lambda cfg: 1.0 if cfg == at_64.in_use else 2.0, tune.Budget(None), float("inf"))
    assert "[the config in use: kept]" in tune._point_line(at_64)


def test_sibling_tables_seed_the_candidates(tmp_path):
    for name in ("nvidia_h100_80gb_hbm3.json", "nvidia_h200.json", "test_gpu_7.json"):
        (tmp_path / name).write_text("{}")
    siblings = tune.sibling_tables("Test GPU 7", tmp_path)
    assert [p.name for p in siblings] == ["nvidia_h100_80gb_hbm3.json", "nvidia_h200.json"]  # not its own table
    points = _points(1, 2)
    other = KernelConfig(block_m=128, block_n1=128, gate_up_dot=True, persistent1=True, tma=True)
    siblings[0].write_text(json.dumps({"configs": {"key0": other.to_dict()}}))
    assert tune.add_table_candidates(points, siblings) == 1 and points[0].candidates[1] == other
    shipped = tune.sibling_tables("NVIDIA H200")  # the package's own: the H100's table seeds an H200 run
    assert [p.name for p in shipped] == ["nvidia_h100_80gb_hbm3.json"]


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_all(capsys):
    assert main(["tune", "--model", "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "17 models -> 17 shapes, 119 points" in out
    assert "E384_K8_H7168_I2048_bf16_T16384 kimi-k2" in out


def test_cli_errors(capsys):
    assert main(["tune", "--model", "mixtral-8x7b", "--num-tokens", "0", "--dry-run"]) == 2
    assert "num_tokens" in capsys.readouterr().err
    assert main(["tune", "--dry-run"]) == 2
    if not torch.cuda.is_available():
        assert main(["tune", "--model", "mixtral-8x7b"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_tune_end_to_end_gpu(tmp_path, capsys, monkeypatch):
    """Warm-up in 2 spawned workers, then timing of every candidate; the table file holds every point with its
    measurements."""
    monkeypatch.setattr(tune, "CANDIDATES", tune.CANDIDATES[:2] + tune.CANDIDATES[8:9])  # 16- and 128-row tiles
    # pointer-load tiled configs only: the warm-up's specialization match is checked for those (TMA descriptor and
    # decode launches: 20 of 1479 first calls still compiled in the timing loop of the H100 run, see bench/NOTES.md)
    monkeypatch.setattr(tune, "TMA_CANDIDATES", [])
    monkeypatch.setattr(tune, "DENSE_GEMM1_CANDIDATES", [])
    monkeypatch.setattr(tune, "ONE_LAUNCH_CANDIDATES", [])
    monkeypatch.setattr(tune, "GLUON_CANDIDATES", [])
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [])
    out = tmp_path / "table.json"
    argv = ["tune", "--model", "olmoe-1b-7b", "--num-tokens", "1", "300", "--out", str(out)]
    assert main([*argv, "--budget-s", "150", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "warm-up: " in text and "== tune summary ==" in text and "2 tuned" in text
    data = json.loads(out.read_text())
    assert data["device"] == torch.cuda.get_device_name()
    assert len(data["configs"]) == 2 and set(data["measured"]) == set(data["configs"])
    for key, cfg in data["configs"].items():
        KernelConfig.from_dict(cfg)
        assert data["measured"][key]["best_us"] <= data["measured"][key]["heuristic_us"]
    # Whether the warm-up compiled what the timing runs is checked without timings, in the interpreter
    # (test_warm_launch_specializes_like_the_real_launch); the "first calls compiled" count the tuner prints is
    # a wall-clock proxy (4 of 8 first calls here on an H200; 20 and 47 of 1478 in the all-preset runs,
    # bench/NOTES.md), not asserted: timings are not how tests check anything.
    timed = sum(int(line.split("; ")[1].split("/")[0]) for line in text.splitlines() if " timed) " in line)
    assert timed >= 4


def test_candidates_add_tma_for_16_bit_and_decode_for_few_slots():
    decode_shape = MoEShape(4, 128, 8, 2048, 768)  # S = 32
    prefill_shape = MoEShape(4096, 128, 8, 2048, 768)
    assert any(c.decode for c in tune.candidate_configs(decode_shape, torch.bfloat16))
    assert not any(c.decode for c in tune.candidate_configs(prefill_shape, torch.bfloat16))
    assert any(c.tma for c in tune.candidate_configs(prefill_shape, torch.bfloat16))
    assert not any(c.tma for c in tune.candidate_configs(prefill_shape, torch.float32))
    dense = [c for c in tune.candidate_configs(prefill_shape, torch.bfloat16) if c.persistent1]
    # GEMM 1's dense forms are timed where TMA is (256 rows per expert: tiles of 128 rows expert by expert)
    assert {tune._expert_grouped(c) for c in tune.DENSE_GEMM1_CANDIDATES} <= set(dense)
    one_launch = {tune._expert_grouped(c) for c in tune.ONE_LAUNCH_CANDIDATES}
    assert one_launch <= set(tune.candidate_configs(prefill_shape, torch.bfloat16))
    # the Gluon forms (gathering GEMM 1 with the ping-pong GEMM 2; GEMM 1 alone in Gluon) for 16-bit dtypes only
    gluon = {tune._expert_grouped(c) for c in tune.GLUON_CANDIDATES}
    assert gluon <= set(tune.candidate_configs(prefill_shape, torch.bfloat16))
    assert not any(c.gluon or c.gluon1 for c in tune.candidate_configs(prefill_shape, torch.float32))


def test_split_tail_twins_follow_their_configs():
    shape = MoEShape(4096, 128, 8, 2048, 768)  # 256 rows per expert
    cands = tune.candidate_configs(shape, torch.bfloat16)
    assert len(cands) == len(set(cands))
    assert cands[1] == dataclasses.replace(cands[0], split_tail=True)  # the heuristic's twin first
    for i, cfg in enumerate(cands[2:], start=2):
        if cfg.split_tail:
            assert cands[i - 1] == dataclasses.replace(cfg, split_tail=False)
        elif cfg.persistent1 and cfg.persistent:  # full tiles in both GEMMs: no twin
            assert i + 1 == len(cands) or not cands[i + 1].split_tail
        elif cfg.block_m >= 64 and not cfg.grouped_mm:
            assert cands[i + 1] == dataclasses.replace(cfg, split_tail=True)
    decode = tune.candidate_configs(MoEShape(1, 128, 8, 2048, 768), torch.bfloat16)
    assert not any(c.split_tail for c in decode)  # 0.06 rows per expert: no tails worth splitting


def test_variants_replace_the_candidates(tmp_path):
    assert tune.parse_variant("split_tail=1,persistent=0") == {"split_tail": 1, "persistent": 0}
    for bad in ("split_tail", "bogus=1", "split_tail=yes"):
        with pytest.raises(ValueError, match="--variants"):
            tune.parse_variant(bad)
    groups = tune.group_shapes(["qwen3-30b-a3b"])
    points = tune.plan_points(groups, [1, 4096], torch.bfloat16)
    entry = KernelConfig(block_m=128, block_n1=128, block_k1=64, num_warps1=8, tma=True, persistent=True)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"device": "x", "configs": {points[1].table_key: entry.to_dict()}}))
    variants = [{"split_tail": 1}, {"split_tail": 1, "persistent": 0}]
    tune.use_variant_candidates(points, variants, [tmp_path / "missing.json", table])
    # T=1: no entry, the heuristic (16-row tiles) cannot take split_tail: the heuristic alone
    assert points[0].candidates == [heuristic_config(points[0].shape, torch.bfloat16)]
    assert points[1].candidates == [
        heuristic_config(points[1].shape, torch.bfloat16),
        entry,
        dataclasses.replace(entry, split_tail=True),
        dataclasses.replace(entry, split_tail=True, persistent=False),
    ]
    # the entry is the config in use: the rematch times it again even when three changes screened faster
    assert points[1].in_use == entry
    heuristic, _, *changes = points[1].candidates
    points[1].times = [(heuristic, 1.0), (entry, 2.0), *((cfg, 0.5) for cfg in changes)]  # the entry screened last
    assert entry in [cfg for cfg, _ in tune.rematch_candidates(points[1])]


def test_dry_run_with_variants_says_what_the_gpu_run_times(capsys):
    assert main(["tune", "--model", "qwen3-30b-a3b", "--num-tokens", "1024", "--variants", "split_tail=1",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "--variants: on the GPU each point times its heuristic, its table entry and 1 change" in out
    assert main(["tune", "--model", "qwen3-30b-a3b", "--variants", "split_tail=yes", "--dry-run"]) == 2
    assert "--variants" in capsys.readouterr().err


def test_table_entries_skips_what_this_version_cannot_read(tmp_path):
    good = KernelConfig(block_m=32)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"configs": {"a": good.to_dict(), "b": {"bogus": 1}, "c": {"block_m": 24}}}))
    assert tune.table_entries(table) == {"a": good}
    assert tune.table_entries(tmp_path / "missing.json") == {}
