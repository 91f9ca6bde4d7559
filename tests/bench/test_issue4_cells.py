"""bench/issue4_cells.py: the issue-4 scorecard read from bench CSVs (the committed run, and made-up rows for the
rules: target, never slower than torch_grouped_mm, 1.3x under 70% of the roofline)."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("issue4_cells", ROOT / "bench" / "issue4_cells.py")
cells = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cells)

FIELDS = ["implementation", "scenario", "num_tokens", "status", "pct_roofline", "speedup", "latency_mean_ms",
          "roofline_ms", "ceiling_bmm_ms", "pct_ceiling_bmm"]  # fmt: skip


def _write(directory: Path, model: str, rows: list[dict]) -> None:
    with (directory / f"h100-triton-{model}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"status": "OK", "roofline_ms": 1.0, "ceiling_bmm_ms": 1.25, "pct_ceiling_bmm": 90, **row})


def _row(scenario: str, num_tokens: int, pct: float, speedup: float, ms: float, implementation="triton") -> dict:
    return dict(implementation=implementation, scenario=scenario, num_tokens=num_tokens, pct_roofline=pct,
                speedup=speedup, latency_mean_ms=ms)  # fmt: skip


def test_the_rules_of_a_cell(tmp_path):
    # qwen3 T=1024 (target 80): met; T=4096 (65): 66% but slower than torch_grouped_mm; mixtral T=1024 (75):
    # no file: no cell; deepseek T=4096: 66% at 1.2x: over the target, but under 70% it needs 1.3x
    _write(tmp_path, "qwen3-30b-a3b", [
        _row("random", 1024, 81, 1.7, 1.2),
        _row("random", 1024, 80, 1.6, 1.26, implementation="triton_deterministic"),
        _row("random", 4096, 66, 0.99, 2.0),
        _row("imbalanced", 1024, 90, 1.9, 1.5),
    ])  # fmt: skip
    _write(tmp_path, "deepseek-v2-lite", [_row("random", 4096, 66, 1.2, 1.0)])
    rows = cells.load(tmp_path)
    text, met = cells.cell(rows, "qwen3-30b-a3b", "random", 1024, None)
    assert met and text == "81.0% (80) 1.70x d1.05 90% [80] met"
    assert not cells.cell(rows, "qwen3-30b-a3b", "random", 4096, None)[1]  # slower than torch_grouped_mm
    assert not cells.cell(rows, "deepseek-v2-lite", "random", 4096, None)[1]  # 66 >= 65, but under 70 at 1.2x
    rows["deepseek-v2-lite", "random", 4096, "triton"]["speedup"] = "1.35"
    assert cells.cell(rows, "deepseek-v2-lite", "random", 4096, None)[1]
    assert cells.cell(rows, "mixtral-8x7b", "random", 1024, None) is None  # no file: no cell
    before = {k: dict(v, latency_mean_ms=str(2 * float(v["latency_mean_ms"]))) for k, v in rows.items()}
    assert "t0.500" in cells.cell(rows, "qwen3-30b-a3b", "random", 1024, before)[0]
    report = cells.report(rows)
    assert "random: 2/3 met, imbalanced: 1/1 met" in report  # qwen3 T=1024, deepseek T=4096 at 1.35x
    assert "imbalanced / random at T >= 1024: 1.25-1.25" in report


def test_mixtral_has_its_own_targets(tmp_path):
    _write(tmp_path, "mixtral-8x7b", [_row("imbalanced", 4096, 86, 1.1, 1.0), _row("imbalanced", 64, 96, 1.0, 1.0)])
    rows = cells.load(tmp_path)
    assert cells.cell(rows, "mixtral-8x7b", "imbalanced", 4096, None)[1]
    assert cells.cell(rows, "mixtral-8x7b", "imbalanced", 64, None)[1]
    assert cells.target("mixtral-8x7b", 1) == 90 and cells.target("gpt-oss-120b", 16384) == 75
    assert cells.SPEEDUP_UNDER_70 == 1.3


def test_the_committed_run_reads():
    """The CSVs in bench/results give all 56 cells, each with its ceiling."""
    report = cells.report(cells.load(ROOT / "bench" / "results"))
    assert report.count(" | ") >= 14 * 4 and " - |" not in report
    assert report.count("% [") == 56  # every cell's ceiling
    assert "/28 met" in report


def test_the_committed_run_at_its_own_rates_is_unchanged():
    # the run's own rates (its Markdown header) give back its pct_roofline to the CSV's rounding; a matmul rate 5%
    # lower lifts a compute-bound point's % by 5%, a memory-bound one's not at all
    rows = cells.load(ROOT / "bench" / "results")
    header = (ROOT / "bench" / "results" / "h100-triton-qwen3-30b-a3b.md").read_text()
    rates = header.split("**roofline**: copy ")[1].split(" TFLOP/s")[0]  # "3008.6 GB/s, matmul 796.42"
    gbps, tflops = float(rates.split(" GB/s")[0]), float(rates.split("matmul ")[1])
    same = cells.at_rates(rows, tflops, gbps)
    for key, row in rows.items():
        if key[0] == "qwen3-30b-a3b" and row["status"] == "OK":
            pct = float(row["pct_roofline"])
            assert abs(float(same[key]["pct_roofline"]) - pct) < 1e-3 * pct, key
    slower = cells.at_rates(rows, tflops / 1.05, gbps)
    compute = ("qwen3-30b-a3b", "random", 16384, "triton")  # compute-bound
    memory = ("qwen3-30b-a3b", "random", 8, "triton")  # weight-bound
    assert abs(float(slower[compute]["pct_roofline"]) / float(same[compute]["pct_roofline"]) - 1.05) < 1e-3
    assert float(slower[memory]["pct_roofline"]) == float(same[memory]["pct_roofline"])
