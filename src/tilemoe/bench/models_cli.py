"""``tilemoe models``: the shipped presets (or one config.json) as a table of MoE layer shapes and costs.

    tilemoe models                               # every preset (a rich table on a terminal with rich)
    tilemoe models --format markdown             # for a README
    tilemoe models --model qwen3-30b-a3b --format json
    tilemoe models --model path/to/config.json   # any config.json, model directory or HF id (online)

GFLOP/tok and weight MB/tok are of ONE MoE layer for one token (MoEConfig.flops_per_token and
weight_bytes_per_token with bf16 weights): the K routed experts, the shared experts and the router.
"""

from __future__ import annotations

import argparse
import json
import sys

from tilemoe.config import MoEConfig
from tilemoe.hf_config import list_presets, load_config

FORMATS = ("table", "markdown", "json")
COLUMNS = ("name", "E", "K", "H", "I", "shared", "routing", "activation", "GFLOP/tok", "weight MB/tok")
NUMERIC = {"E", "K", "H", "I", "GFLOP/tok", "weight MB/tok"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="list the model presets: experts, sizes, routing, FLOPs and weight bytes per token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="show one model: a preset name, a config.json path, a model directory or an HF model id",
    )
    parser.set_defaults(run=run)
    return parser


def shared_label(config: MoEConfig) -> str:
    """'-', or 'N x Is' with '+gate' when a sigmoid gate scales the shared expert (Qwen2-MoE)."""
    if not config.has_shared_experts:
        return "-"
    label = f"{config.num_shared_experts}x{config.shared_intermediate_size // config.num_shared_experts}"
    return label + "+gate" if config.shared_expert_gate else label


def routing_label(config: MoEConfig) -> str:
    """Routing name plus what changes its math: renormalisation, groups, correction bias, scaling."""
    parts = [config.routing]
    if config.routing in ("softmax_topk", "sigmoid_grouped_topk", "softmax_grouped_topk") and config.renormalize:
        parts.append("norm")
    if config.routing in ("sigmoid_grouped_topk", "softmax_grouped_topk") and config.n_group > 1:
        parts.append(f"g{config.topk_group}/{config.n_group}")
    if config.score_correction_bias:
        parts.append("bias")
    if config.routed_scaling_factor != 1.0:
        parts.append(f"x{config.routed_scaling_factor:g}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def model_row(name: str, config: MoEConfig) -> dict:
    """One table row; numbers stay numbers (json keeps them exact)."""
    if config.activation == "swigluoai":
        activation = f"swigluoai(a={config.swiglu_alpha:g}, lim={config.swiglu_limit:g})"
    else:
        activation = config.activation if config.gated else f"{config.activation} (plain)"
    return {
        "name": name,
        "E": config.num_experts,
        "K": config.top_k,
        "H": config.hidden_size,
        "I": config.intermediate_size,
        "shared": shared_label(config),
        "routing": routing_label(config),
        "activation": activation,
        "GFLOP/tok": round(config.flops_per_token() / 1e9, 4),
        "weight MB/tok": round(config.weight_bytes_per_token(2) / 1e6, 2),
        "source": config.extra.get("source", ""),
    }


def collect_rows(model: str | None) -> list[dict]:
    if model is None:
        return [model_row(name, load_config(name)) for name in list_presets()]
    config = load_config(model)
    return [model_row(config.name or model, config)]


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if column == "GFLOP/tok":
        return f"{value:.3f}"
    if column == "weight MB/tok":
        return f"{value:.1f}"
    return str(value)


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def format_plain(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(len(COLUMNS))]

    def fmt(line: list[str]) -> str:
        return "  ".join(v.rjust(w) if c in NUMERIC else v.ljust(w) for v, w, c in zip(line, widths, COLUMNS)).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells[1:]])


def _print_rich(rows: list[dict]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title="tilemoe presets: one MoE layer, per token (bf16 weights)")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in NUMERIC else "left")
    for row in rows:
        table.add_row(*(_cell(row, c) for c in COLUMNS))
    Console(file=sys.stdout).print(table)
    return True


def run(args: argparse.Namespace) -> int:
    try:
        rows = collect_rows(getattr(args, "model", None))
    except ValueError as error:
        print(f"tilemoe models: {error}", file=sys.stderr)
        return 2
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "markdown":
        print(format_markdown(rows))
    elif not (sys.stdout.isatty() and _print_rich(rows)):  # pipes and files get plain, unwrapped text
        print(format_plain(rows))
    return 0
