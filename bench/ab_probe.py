"""Two (or more) source trees' kernels timed in turn, at the same points, in one GPU call.

    python3 bench/ab_probe.py --trees main=src old=bench/.trees/old/src --points qwen3-30b-a3b:4096 ... [--rounds 3]

A code change that no KernelConfig field switches (an order of loads inside a kernel, say) can only be compared
against the code before it; the issue asks for comparisons in one run, implementations in turn, since an H100's
clock drifts under its power cap and two machines differ by 3-5% (bench/NOTES.md, runs 19 and 20). Each round runs
``bench/kernel_probe.py`` once per tree, in a fresh process with that tree's ``src`` first on PYTHONPATH (the probe
itself and its options come from this checkout), and reads its per-point "base" line (the table entry: GEMM 1,
GEMM 2 and all kernels, us per layer call). A first round in parallel warms each tree's Triton cache (compiles are
CPU-bound); the report gives each tree's median over the timed rounds, and its ratio to the first tree.

A tree: ``bench/ab_tree.sh NAME COMMIT`` writes ``bench/.trees/NAME/src`` (git archive of that commit's ``src``;
``bench/.trees`` is ignored: carry it to the device).

    python3 bench/ab_probe.py --arms random="--scenario random" balanced="--scenario balanced" --points ...

``--arms`` instead: this checkout's ``src`` under different kernel_probe options (one arm or more, each round in
turn): the routing that pays no padding against the bench's, or one table entry across points (``--entry-tokens``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent / "kernel_probe.py"
POINT = re.compile(r"^## (\S+) T=(\d+) ")
BASE = re.compile(r"^\s+base\s+gemm1\s+([\d.]+) gemm2\s+([\d.]+) total\s+([\d.]+) us")


def parse_probe(text: str) -> dict[str, tuple[float, float, float]]:
    """kernel_probe's output -> {"model:T": (gemm1, gemm2, total)} from each point's "base" line."""
    times, point = {}, None
    for line in text.splitlines():
        if match := POINT.match(line):
            point = f"{match[1]}:{match[2]}"
        elif (match := BASE.match(line)) and point is not None:
            times[point] = tuple(float(v) for v in match.groups())
    return times


def parse_trees(items: list[str]) -> dict[str, Path]:
    """["name=path/to/src", ...] -> {name: Path}; each path must hold the tilemoe package."""
    trees = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--trees: expected NAME=PATH, got {item!r}")
        if not (Path(path) / "tilemoe" / "__init__.py").is_file():
            raise ValueError(f"--trees: {path!r} (for {name!r}) holds no tilemoe package")
        if name in trees:
            raise ValueError(f"--trees: the name {name!r} is given twice")
        trees[name] = Path(path)
    if len(trees) < 2:
        raise ValueError(f"--trees: expected at least two trees, got {len(trees)}")
    return trees


def parse_arms(items: list[str]) -> dict[str, list[str]]:
    """["name=kernel_probe options", ...] -> {name: [option, ...]} (one arm or more)."""
    arms = {}
    for item in items:
        name, sep, options = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--arms: expected NAME=OPTIONS, got {item!r}")
        if name in arms:
            raise ValueError(f"--arms: the name {name!r} is given twice")
        arms[name] = shlex.split(options)
    return arms


def probe_command(points: list[str], options: list[str] = ()) -> list[str]:
    return [sys.executable, str(PROBE), "--points", *points, "--no-breakdown", "--no-stats", *options]


def run_tree(src: Path, points: list[str], options: list[str] = ()) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src.resolve()), os.environ.get("PYTHONPATH", "")]))
    command = probe_command(points, options)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def report(trees: list[str], rounds: list[dict[str, dict]], points: list[str], label: str = "tree") -> list[str]:
    """Markdown rows: each point and tree (or arm), the median GEMM 1 / GEMM 2 / total over the rounds, and total /
    first tree's total."""
    lines = [f"| point | {label} | GEMM 1 | GEMM 2 | all kernels | vs {trees[0]} |", "|---|---|---|---|---|---|"]
    for point in points:
        first = None
        for tree in trees:
            samples = [r[tree][point] for r in rounds if point in r.get(tree, {})]
            if not samples:
                lines.append(f"| {point} | {tree} | - | - | - | no result |")
                continue
            g1, g2, total = (statistics.median(s[i] for s in samples) for i in range(3))
            first = total if first is None else first
            lines.append(f"| {point} | {tree} | {g1:.1f} | {g2:.1f} | {total:.1f} | {total / first:.3f}x |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trees", nargs="+", metavar="NAME=SRC")
    which.add_argument("--arms", nargs="+", metavar="NAME=OPTIONS", help="this checkout's src, kernel_probe options")
    parser.add_argument("--points", nargs="+", required=True, metavar="MODEL:T")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each tree once per round, in turn")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one probe process")
    parser.add_argument(
        "--probe-options",
        default="",
        help="kernel_probe options for every tree (with --trees), given with '=' (--probe-options=--allow-wrong): "
        "a separate value starting with '--' is read as an option of this tool",
    )
    args = parser.parse_args(argv)
    if args.trees:
        options = shlex.split(args.probe_options)
        runs, label = {name: (src, options) for name, src in parse_trees(args.trees).items()}, "tree"
    else:
        src = Path(__file__).resolve().parents[1] / "src"
        runs, label = {name: (src, options) for name, options in parse_arms(args.arms).items()}, "arm"
    warm = [run_tree(src, args.points, options) for src, options in runs.values()]  # in parallel
    for proc in warm:
        proc.communicate(timeout=args.timeout)
    rounds = []
    for index in range(args.rounds):
        results = {}
        for name, (src, options) in runs.items():
            proc = run_tree(src, args.points, options)
            out, _ = proc.communicate(timeout=args.timeout)
            results[name] = parse_probe(out)
            if not results[name]:
                print(f"round {index + 1}, {name}: no result; its output ended with:\n{out[-1500:]}")
        rounds.append(results)
        print(f"round {index + 1}: " + "; ".join(f"{n} {len(r)} points" for n, r in results.items()), flush=True)
    print("\n".join(report(list(runs), rounds, args.points, label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
