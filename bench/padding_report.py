"""How many of the rows the expert GEMMs compute are padding, per table entry, for the bench's routings (CPU only).

    python3 bench/padding_report.py [--table nvidia_h100_80gb_hbm3] [--models ...] [--num-tokens 1024 4096 16384]

For each (model, T, scenario): the routing ``tilemoe bench`` draws (same seeds), each expert's rows padded as the
table's config runs them: block_m-row tiles; with split_tail an expert's last block holding at most block_m / 2 rows
runs a half tile, except in a persistent GEMM without persistent_tails (full tiles only). Printed: real rows / computed
rows for GEMM 1 and GEMM 2, and what persistent_tails would make of a persistent GEMM. A development tool behind
bench/NOTES.md, version 10; claims of speed come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import json

import torch

from tilemoe.bench.scenarios import make_routing_for
from tilemoe.config import MoEConfig
from tilemoe.tuning import TABLE_DIR, KernelConfig, MoEShape, shape_key


def computed_rows(counts: list[int], block_m: int, half_tails: bool) -> int:
    rows = 0
    for n in counts:
        full, rest = divmod(n, block_m)
        rows += full * block_m + (0 if rest == 0 else block_m // 2 if half_tails and rest <= block_m // 2 else block_m)
    return rows


def bench_counts(model: str, tokens: int, scenario: str) -> list[int]:
    """Rows per expert of the routing ``tilemoe bench`` draws for (model, tokens, scenario) with its default seed."""
    config = MoEConfig.from_pretrained(model)
    gen = torch.Generator().manual_seed(tokens * 31 + len(scenario))  # runner.run_case's seed with --seed 0
    x = torch.randn(tokens, config.hidden_size, generator=gen)
    _, ids = make_routing_for(scenario, tokens, config, generator=gen, x=x)
    return torch.bincount(ids.flatten().long(), minlength=config.num_experts).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="nvidia_h100_80gb_hbm3")
    parser.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b",
                                                         "mixtral-8x7b"])  # fmt: skip
    parser.add_argument("--num-tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    args = parser.parse_args()
    configs = json.loads((TABLE_DIR / f"{args.table}.json").read_text())["configs"]
    print("model\tT\tentry\tscenario\tGEMM 1\tGEMM 2\twith persistent_tails")
    for model in args.models:
        config = MoEConfig.from_pretrained(model)
        for tokens in args.num_tokens:
            shape = MoEShape(tokens, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
            entry = configs.get(shape_key(shape, torch.bfloat16))
            if entry is None:
                continue
            cfg = KernelConfig.from_dict(entry)
            flags = f"bm{cfg.block_m} split{int(cfg.split_tail)} p1{int(cfg.persistent1)} p2{int(cfg.persistent)}"
            for scenario in ("random", "imbalanced"):
                counts = bench_counts(model, tokens, scenario)
                real = sum(counts)
                g1 = real / computed_rows(counts, cfg.block_m, cfg.split_tail and not cfg.persistent1)
                g2 = real / computed_rows(counts, cfg.block_m, cfg.split_tail and not cfg.persistent)
                tails = real / computed_rows(counts, cfg.block_m, True)
                print(f"{model}\t{tokens}\t{flags}\t{scenario}\t{g1:.3f}\t{g2:.3f}\t{tails:.3f}")


if __name__ == "__main__":
    main()
