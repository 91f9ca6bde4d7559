"""Bench output: CSV (fixed leading columns), Markdown (header + a table per scenario and token count),
JSON, and the console table."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from tilemoe.bench.runner import COLUMNS

GPU_STATE_QUERY = "power.limit,clocks.max.sm,clocks.sm,temperature.gpu,power.draw"


def gpu_state(device: torch.device, run=subprocess.run) -> str | None:
    """The GPU's power limit, SM clocks and temperature as ``nvidia-smi`` reads them now (before the timing), e.g.
    "power limit 700 W, SM clock 1980 MHz max / 1755 now, 33 C, 71 W": two H100s ran the same kernels several % apart
    (bench/NOTES.md, runs 25-26), and this is what a reader can compare. The GPU is picked by its UUID, so none is
    named wrongly; None where there is no CUDA device, no UUID or no nvidia-smi, or the query fails."""
    if device.type != "cuda":
        return None
    try:
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is None:
            return None
        uuid = str(uuid)
        result = run(
            ["nvidia-smi", f"--query-gpu={GPU_STATE_QUERY}", "--format=csv,noheader,nounits",
             "-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        limit, max_clock, clock, temperature, draw = (v.strip() for v in result.stdout.strip().split(","))
        return (
            f"power limit {float(limit):.0f} W, SM clock {max_clock} MHz max / {clock} now, {temperature} C, "
            f"{float(draw):.0f} W"
        )
    except (OSError, ValueError, subprocess.SubprocessError, RuntimeError):
        return None


def environment(device: torch.device) -> dict:
    """Device and software versions for the report header (and ``gpu state``, ``gpu_state``'s line, where known)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    state = gpu_state(device)
    return {
        "device": name,
        **({"gpu state": state} if state else {}),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "tilemoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("tilemoe", "__main__.py")
        else " ".join(shlex.quote(a) for a in sys.argv),
    }


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}g}"
    return str(value)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, ""), 6) for k in COLUMNS})
    return buf.getvalue()


def to_json(rows: list[dict], header: dict) -> str:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    return json.dumps({"header": header, "rows": [{k: clean(r.get(k)) for k in COLUMNS} for r in rows]}, indent=1)


def _cell_latency(row: dict) -> str:
    return _fmt(row["latency_mean_ms"]) if row["status"] == "OK" else row["status"]


def _has_ceiling(rows: list[dict]) -> bool:
    return any(isinstance(r.get("ceiling_bmm_ms"), float) and not math.isnan(r["ceiling_bmm_ms"]) for r in rows)


def to_markdown(rows: list[dict], header: dict, title: str = "tilemoe bench") -> str:
    lines = [f"# {title}", ""]
    for key, value in header.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"- **{key}**: {'`' + value + '`' if key == 'command' else value}")
    lines.append("")
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault((row["scenario"], row["num_tokens"]), []).append(row)
    for (scenario, tokens), case in cases.items():
        first = case[0]
        has_ceiling = _has_ceiling(case)
        ceiling_line = ""
        if has_ceiling:
            ceiling = first["ceiling_bmm_ms"]
            pct = 100.0 * first["roofline_ms"] / ceiling if ceiling > 0 else math.nan
            ceiling_line = f"; cuBLAS bmm ceiling {_fmt(ceiling)} ms ({_fmt(pct, 3)}% of the roofline)"
        lines += [
            f"## {scenario}, {tokens} tokens",
            "",
            f"loads: max {first['max_load']}, min {first['min_load']}, avg {_fmt(first['avg_load'])}, "
            f"max_imbalance {_fmt(first['max_imbalance'])}; roofline {_fmt(first['roofline_ms'])} ms{ceiling_line}",
            "",
            "| implementation | status | mean ms | p95 ms | tok/s | TFLOP/s | GB/s | % roofline | "
            + ("% bmm ceiling | " if has_ceiling else "")
            + "imbalance | speedup vs "
            + (first["baseline"] or "-")
            + " | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_ceiling else "") + "---:|---:|---|",
        ]
        for r in case:
            note = str(r["note"]).replace("|", "/").replace("\n", " ")[:120]
            ceiling_cell = f" {_fmt(r.get('pct_ceiling_bmm', math.nan), 3)} |" if has_ceiling else ""
            lines.append(
                f"| {r['implementation']} | {r['status']} | {_fmt(r['latency_mean_ms'])} | {_fmt(r['latency_p95_ms'])} "
                f"| {_fmt(r['throughput_tok_per_sec'])} | {_fmt(r['tflops'])} | {_fmt(r['gbps'])} "
                f"| {_fmt(r['pct_roofline'], 3)} |{ceiling_cell} {_fmt(r['max_imbalance'], 3)} "
                f"| {_fmt(r['speedup'], 3)} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


CONSOLE_COLUMNS = (
    ("impl", "implementation"),
    ("scenario", "scenario"),
    ("tokens", "num_tokens"),
    ("status", "status"),
    ("mean ms", "latency_mean_ms"),
    ("p95 ms", "latency_p95_ms"),
    ("tok/s", "throughput_tok_per_sec"),
    ("TFLOP/s", "tflops"),
    ("GB/s", "gbps"),
    ("%roof", "pct_roofline"),
    ("imbal", "max_imbalance"),
    ("speedup", "speedup"),
)


def print_console(rows: list[dict], title: str = "tilemoe bench", file=None) -> None:
    """The result table on the console (rich when installed, plain text otherwise); with ``--bmm-ceiling`` one more
    column, each row's % of the cuBLAS ceiling."""
    columns = CONSOLE_COLUMNS + ((("%ceil", "pct_ceiling_bmm"),) if _has_ceiling(rows) else ())
    cells = [[_fmt(r.get(key, ""), 4) for _, key in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title=title)
        for label, _ in columns:
            table.add_column(label, justify="left" if label in ("impl", "scenario", "status") else "right")
        for c in cells:
            table.add_row(*c)
        Console(file=file or sys.stdout, width=160).print(table)
        return
    widths = [max(len(label), *(len(c[i]) for c in cells)) for i, (label, _) in enumerate(columns)]
    out = file or sys.stdout
    print(title, file=out)
    print("  ".join(label.ljust(w) for (label, _), w in zip(columns, widths)), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)), file=out)


def write_outputs(rows: list[dict], header: dict, base: str, formats: str, title: str = "tilemoe bench") -> list[Path]:
    """Write ``base``.csv / .md / .json per ``formats`` (csv, markdown, json, both = csv+markdown, all)."""
    wanted = {"csv": {"csv"}, "markdown": {"md"}, "json": {"json"}, "both": {"csv", "md"}, "all": {"csv", "md", "json"}}
    if formats not in wanted:
        raise ValueError(f"output_format: expected one of {sorted(wanted)}, got {formats!r}")
    base_path = Path(base)
    if base_path.suffix in (".csv", ".md", ".json"):
        base_path = base_path.with_suffix("")
    base_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in sorted(wanted[formats]):
        path = base_path.with_name(base_path.name + "." + ext)
        if ext == "csv":
            path.write_text(to_csv(rows))
        elif ext == "md":
            path.write_text(to_markdown(rows, header, title))
        else:
            path.write_text(to_json(rows, header))
        written.append(path)
    return written
