"""``tilemoe journey``: every rung of the implementation ladder on one model, to show where MoE speed comes from.

    tilemoe journey --model qwen3-30b-a3b --num-tokens 2048 8192 16384 32768

Prints (and with ``--output-file BASE`` writes BASE.md and BASE.csv) two tables:
  1. per level at one token count (the largest at which level 0 ran): technique, time, speedup vs level 0,
     change from the previous level, what it does;
  2. the scale table: tokens x level, with OOM / skipped / n/a (not available on this device) shown as such.
Level 0 (``naive``) is skipped above ``--max-naive-tokens`` (shown as skipped, never as a time).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from tilemoe.bench.cli import build_settings, progress_bar
from tilemoe.bench.options import add_model_device_flags
from tilemoe.impls import all_impls, get_impl

GPU_TOKENS = [2048, 8192, 16384, 32768]
CPU_TOKENS = [1, 16, 64]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "journey",
        help="run every level of the implementation ladder and show what each step buys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_device_flags(parser)
    parser.add_argument("--num-tokens", nargs="+", type=int, default=None, help="default 2048 8192 16384 32768 on GPU")
    parser.add_argument("--scenario", default="random", choices=("random", "balanced", "imbalanced", "zipf"))
    parser.add_argument("--max-naive-tokens", type=int, default=None, help="skip level 0 above this (GPU 2048, CPU 64)")
    parser.add_argument("--no-own", action="store_true", help="ladder levels only, without tilemoe's own kernels")
    parser.add_argument("--output-file", default=None, help="base path: writes BASE.md and BASE.csv")
    parser.set_defaults(
        run=run,
        ep_size=1,
        tp_size=None,
        nnodes=1,
        node_rank=0,
        routing_trace=None,
        imbalance_factor=3.0,
        zipf_alpha=1.2,
    )
    return parser


def journey_impls(include_own: bool = True) -> list[str]:
    """Ladder levels in order, then tilemoe's own single-device implementations (best last)."""
    ladder = [i for i in all_impls() if i.level is not None]
    own = []
    if include_own:
        own = [i for i in all_impls() if i.level is None and not i.distributed and i.name != "reference"]
        own.sort(key=lambda i: i.auto_priority)
    return [i.name for i in ladder + own]


def _level_label(name: str) -> str:
    level = get_impl(name).level
    return "own" if level is None else str(level)


def _cell(row: dict) -> str:
    if row["status"] == "OK":
        return f"{row['latency_mean_ms']:.4g} ms"
    if row["status"] == "SKIPPED":
        return "n/a" if row["note"].startswith("not available") else "skipped"
    return row["status"]


def journey_tables(
    rows: list[dict], impls: list[str], tokens: list[int]
) -> tuple[int, list[list[str]], list[list[str]]]:
    """(detail token count, level table rows, scale table rows) as strings."""
    by = {(r["implementation"], r["num_tokens"]): r for r in rows}
    naive_ran = [t for t in tokens if by.get(("naive", t), {}).get("status") == "OK"]
    detail = max(naive_ran) if naive_ran else min(tokens)
    level_rows = []
    naive = by.get(("naive", detail))
    base = naive["latency_mean_ms"] if naive and naive["status"] == "OK" else math.nan
    prev = math.nan
    for name in impls:
        r = by[(name, detail)]
        ms = r["latency_mean_ms"] if r["status"] == "OK" else math.nan
        speedup = f"{base / ms:.3g}x" if not math.isnan(base) and not math.isnan(ms) else "-"
        if math.isnan(ms) or math.isnan(prev):
            change = "-"
        else:
            change = f"{prev / ms:.3g}x faster" if prev >= ms else f"{ms / prev:.3g}x slower"
        level_rows.append([_level_label(name), name, _cell(r), speedup, change, get_impl(name).description])
        if not math.isnan(ms):
            prev = ms
    scale_rows = [[str(t)] + [_cell(by[(name, t)]) for name in impls] for t in tokens]
    return detail, level_rows, scale_rows


def _markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return lines


LEVEL_HEAD = ["level", "technique", "time", "speedup vs level 0", "change from previous", "what it does"]


def journey_markdown(rows, impls, tokens, header: dict) -> str:
    detail, level_rows, scale_rows = journey_tables(rows, impls, tokens)
    lines = ["# tilemoe journey", ""]
    for key, value in header.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"- **{key}**: {'`' + value + '`' if key == 'command' else value}")
    lines += ["", f"## Per level, {detail} tokens", ""]
    lines += _markdown_table(LEVEL_HEAD, level_rows)
    lines += ["", "## Scale: tokens x level (mean latency)", ""]
    lines += _markdown_table(["tokens"] + [f"{_level_label(n)} {n}" for n in impls], scale_rows)
    failed = [r for r in rows if r["status"] in ("FAILED", "OOM") and r["note"]]
    if failed:
        lines += ["", "## Notes", ""]
        lines += [
            f"- {r['implementation']} at {r['num_tokens']} tokens: {r['status']}: {r['note'][:200]}" for r in failed
        ]
    return "\n".join(lines) + "\n"


def _print_tables(rows, impls, tokens) -> None:
    detail, level_rows, scale_rows = journey_tables(rows, impls, tokens)
    scale_head = ["tokens"] + [f"{_level_label(n)} {n}" for n in impls]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"Per level, {detail} tokens")
        print("\n".join(_markdown_table(LEVEL_HEAD, level_rows)))
        print("Scale: tokens x level")
        print("\n".join(_markdown_table(scale_head, scale_rows)))
        return
    console = Console(width=200)
    for title, head, body in (
        (f"Per level, {detail} tokens", LEVEL_HEAD, level_rows),
        ("Scale: tokens x level (mean latency)", scale_head, scale_rows),
    ):
        table = Table(title=title)
        for h in head:
            table.add_column(h)
        for row in body:
            table.add_row(*row)
        console.print(table)


def run(args: argparse.Namespace) -> int:
    from tilemoe.bench.report import to_csv
    from tilemoe.bench.roofline import get_roofline
    from tilemoe.bench.runner import run_bench

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.warmup_iters is None:
        args.warmup_iters = 3 if on_gpu else 1
    if args.benchmark_iters is None:
        args.benchmark_iters = 20 if on_gpu else 3
    if args.num_tokens is None:
        args.num_tokens = GPU_TOKENS if on_gpu else CPU_TOKENS
    args.scenarios = [args.scenario]
    try:
        settings, header = build_settings(args, command="journey")
    except (ValueError, TypeError, OSError) as error:
        print(f"tilemoe journey: error: {error}", file=sys.stderr)
        return 2
    max_naive = args.max_naive_tokens if args.max_naive_tokens is not None else (2048 if on_gpu else 64)
    impls = journey_impls(include_own=not args.no_own)
    settings.impls = impls
    settings.baseline = "naive"
    settings.rounds = min(settings.rounds, settings.iters)
    header["timing"]["rounds"] = settings.rounds
    settings.skip = lambda name, t: f"T > --max-naive-tokens {max_naive}" if name == "naive" and t > max_naive else None
    header["implementations"] = ", ".join(impls)
    roofline = get_roofline(settings.device, settings.dtype)
    with progress_bar(len(settings.num_tokens), enabled=sys.stderr.isatty()) as advance:
        rows = run_bench(settings, roofline, progress=advance)
    if "note" in header:
        print(header["note"])
    _print_tables(rows, impls, settings.num_tokens)
    if args.output_file:
        from pathlib import Path

        base = Path(args.output_file)
        if base.suffix in (".md", ".csv"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        md = base.with_name(base.name + ".md")
        md.write_text(journey_markdown(rows, impls, settings.num_tokens, header))
        csv_path = base.with_name(base.name + ".csv")
        csv_path.write_text(to_csv(rows))
        print(f"wrote {md}\nwrote {csv_path}")
    return 0
