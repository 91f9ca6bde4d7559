"""Issue 4's scorecard from `tilemoe bench` CSVs: one Markdown table per scenario, a cell per (T, model).

    python3 bench/issue4_cells.py [DIR] [--before DIR] [--rates TFLOPS GBPS]     DIR: bench/results by default

A cell: triton's % of the roofline by the mean (the issue's target), its speedup over torch_grouped_mm,
d = triton_deterministic / triton, triton's % of the cuBLAS bmm ceiling, [the ceiling's own % of the roofline],
and "met" when the target is reached and triton is no slower than torch_grouped_mm (and >= 1.3x where under 70%).
``--before DIR``: the same CSVs of an earlier run; each cell then adds triton's time against it (now / before).
``--rates TFLOPS GBPS``: the % of the roofline (and the targets' verdicts) against a roofline of these rates instead of
the run's own, from each row's ``flops`` and ``bytes``: the same kernels read ~5% apart on two H100s whose matmul
bursts measured 757 and 796 TFLOP/s (runs 24 and 25), so two runs compare on one roofline. The issue's cells are the
run's own (no ``--rates``).
The count of met cells and the rules' other checks (imbalanced / random at T >= 1024) close the output.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tilemoe.bench.metrics import roofline_seconds

MODELS = ("qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b", "mixtral-8x7b")
TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
SCENARIOS = ("random", "imbalanced")
# (T range) -> % of the roofline: the three top-k models, and mixtral-8x7b
TARGETS = {1: (60, 90), 8: (88, 95), 64: (88, 95), 256: (88, 95), 1024: (80, 75), 4096: (65, 85), 16384: (75, 88)}
SPEEDUP_UNDER_70 = 1.3


def target(model: str, tokens: int) -> float:
    return TARGETS[tokens][1 if model.startswith("mixtral") else 0]


def load(directory: Path) -> dict[tuple[str, str, int, str], dict]:
    """Rows by (model, scenario, T, implementation) from ``h100-triton-<model>.csv`` in ``directory``."""
    rows = {}
    for model in MODELS:
        path = directory / f"h100-triton-{model}.csv"
        if not path.exists():
            continue
        for row in csv.DictReader(path.open()):
            rows[model, row["scenario"], int(row["num_tokens"]), row["implementation"]] = row
    return rows


def at_rates(rows: dict, tflops: float, gbps: float) -> dict:
    """``rows`` with pct_roofline and roofline_ms recomputed for a roofline of ``tflops`` and ``gbps``, by the bench's
    own ``roofline_seconds``."""
    rescaled = {}
    for key, row in rows.items():
        row = dict(row)
        if row.get("status") == "OK" and row.get("flops") and row.get("bytes"):
            roofline_ms = 1e3 * roofline_seconds(float(row["flops"]), float(row["bytes"]), tflops * 1e12, gbps * 1e9)
            row["roofline_ms"] = f"{roofline_ms:.6g}"
            row["pct_roofline"] = f"{100 * roofline_ms / float(row['latency_mean_ms']):.6g}"
        rescaled[key] = row
    return rescaled


def cell(rows: dict, model: str, scenario: str, tokens: int, before: dict | None) -> tuple[str, bool] | None:
    triton = rows.get((model, scenario, tokens, "triton"))
    if triton is None or triton["status"] != "OK":
        return None
    pct, speedup = float(triton["pct_roofline"]), float(triton["speedup"])
    goal = target(model, tokens)
    met = pct >= goal and speedup >= 1.0 and (pct >= 70 or speedup >= SPEEDUP_UNDER_70)
    parts = [f"{pct:.1f}% ({goal:g})", f"{speedup:.2f}x"]
    det = rows.get((model, scenario, tokens, "triton_deterministic"))
    if det and det["status"] == "OK":
        parts.append(f"d{float(det['latency_mean_ms']) / float(triton['latency_mean_ms']):.2f}")
    if triton.get("pct_ceiling_bmm"):
        roofline, ceiling = float(triton["roofline_ms"]), float(triton["ceiling_bmm_ms"])
        parts.append(f"{float(triton['pct_ceiling_bmm']):.0f}% [{100 * roofline / ceiling:.0f}]")
    old = (before or {}).get((model, scenario, tokens, "triton"))
    if old and old["status"] == "OK":
        parts.append(f"t{float(triton['latency_mean_ms']) / float(old['latency_mean_ms']):.3f}")
    if met:
        parts.append("met")
    return " ".join(parts), met


def report(rows: dict, before: dict | None = None) -> str:
    lines, met_counts = [], {}
    for scenario in SCENARIOS:
        lines += [f"{scenario}:", "", "| T | " + " | ".join(MODELS) + " |", "|---" * (len(MODELS) + 1) + "|"]
        met_counts[scenario] = [0, 0]
        for tokens in TOKENS:
            cells = []
            for model in MODELS:
                got = cell(rows, model, scenario, tokens, before)
                cells.append(got[0] if got else "-")
                if got:
                    met_counts[scenario][0] += got[1]
                    met_counts[scenario][1] += 1
            lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(", ".join(f"{s}: {m}/{n} met" for s, (m, n) in met_counts.items()))
    ratios = []
    for model in MODELS:
        for tokens in (t for t in TOKENS if t >= 1024):
            rnd, imb = (rows.get((model, s, tokens, "triton")) for s in SCENARIOS)
            if rnd and imb:
                ratios.append(float(imb["latency_mean_ms"]) / float(rnd["latency_mean_ms"]))
    if ratios:
        lines.append(f"imbalanced / random at T >= 1024: {min(ratios):.2f}-{max(ratios):.2f} (<= 1.15)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--before", default=None, help="an earlier run's directory: adds now / before times")
    parser.add_argument("--rates", nargs=2, type=float, metavar=("TFLOPS", "GBPS"), default=None,
                        help="a roofline of these matmul / copy rates instead of the run's own")  # fmt: skip
    args = parser.parse_args(argv)
    rows = load(Path(args.directory))
    if not rows:
        parser.error(f"no h100-triton-<model>.csv in {args.directory}")
    if args.rates:
        rows = at_rates(rows, *args.rates)
    print(report(rows, load(Path(args.before)) if args.before else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
