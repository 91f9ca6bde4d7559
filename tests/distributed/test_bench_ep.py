"""``tilemoe bench --ep-size N`` on CPU: gloo processes at tiny sizes start, pass the reference gate, finish.

The 4- and 8-rank runs are the CPU dry run of the 4- and 8-GPU benchmark (issue 6): the same code path, gloo
instead of NCCL.
"""

from __future__ import annotations

import csv

import pytest

from tilemoe.cli import main

TINY = [
    "--device",
    "cpu",
    "--manual-config",
    "--num-experts",
    "8",
    "--num-experts-per-tok",
    "2",
    "--hidden-size",
    "32",
    "--intermediate-size",
    "16",
    "--warmup-iters",
    "1",
    "--benchmark-iters",
    "2",
]


@pytest.mark.parametrize(
    ("ep", "tp"),
    [
        (4, 4),  # issue 6's 4-GPU run, on gloo
        (8, 8),  # issue 6's 8-GPU run, on gloo
        (2, 4),  # EP + TP: 2 EP ranks, each split over 2
    ],
)
def test_bench_ep_dry_run(ep, tp, tmp_path, capsys):
    base = tmp_path / f"ep{ep}"
    code = main(["bench", *TINY, "--ep-size", str(ep), "--tp-size", str(tp), "--num-tokens", "0", "6",
                 "--scenarios", "imbalanced", "--output-file", str(base)])  # fmt: skip
    assert code == 0, capsys.readouterr()
    with open(f"{base}.csv") as f:
        rows = list(csv.DictReader(f))
    # single and epmoe for T = 0 and 6; every row passed the float64 reference gate
    assert [(r["implementation"], r["num_tokens"]) for r in rows] == [
        ("single", "0"), ("epmoe", "0"), ("single", "6"), ("epmoe", "6")
    ]  # fmt: skip
    assert all(r["status"] == "OK" and (r["ep_size"], r["tp_size"]) == (str(ep), str(tp)) for r in rows), rows
    assert float(rows[3]["latency_p50_ms"]) > 0
    # tp ranks x 6 tokens x K=2 pairs over 8 experts: the per-expert loads sum to 12 * tp
    assert float(rows[3]["avg_load"]) * 8 == pytest.approx(6 * tp * 2)


def test_bench_ep_bad_flags(capsys):
    assert main(["bench", *TINY, "--ep-size", "2", "--impl", "grouped"]) == 2
    assert "'epmoe', 'fused'" in capsys.readouterr().err
    assert main(["bench", *TINY, "--ep-size", "2", "--nnodes", "2", "--node-rank", "0"]) == 2
    assert "--dist-init-addr" in capsys.readouterr().err


def test_single_baseline_is_the_faster_passing_one_gpu_row():
    from tilemoe.bench.distributed_runner import _single_baseline

    def row(ms, status="OK"):
        return {"latency_p50_ms": ms, "status": status}

    assert _single_baseline({"single": row(0.7), "single-graph": row(0.4), "epmoe": row(0.1)}) == 0.4
    assert _single_baseline({"single": row(0.7), "single-graph": row(0.4, "FAILED")}) == 0.7
    assert _single_baseline({"single": row(0.7)}) == 0.7
    nan = float("nan")
    assert _single_baseline({"single": row(nan, "FAILED")}) != _single_baseline({"single": row(nan, "FAILED")})
