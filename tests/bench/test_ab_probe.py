"""bench/ab_probe.py: reading kernel_probe's output, the trees' arguments, the report (its GPU runs are the
device's)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "ab_probe.py"
_SPEC = importlib.util.spec_from_file_location("ab_probe", _PATH)
ab_probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ab_probe)

# kernel_probe's lines as session 15's call B printed them (two points; a variant line and a refused one between)
PROBE_OUTPUT = """# NVIDIA H100 80GB HBM3 torch 2.11.0+cu130 triton 3.6.0

## qwen3-30b-a3b T=4096 (S=32768, H=2048, I=768, E=128) rel_err 4.64e-03
picked: KernelConfig(block_m=128, ...)
  base                                     gemm1    412.7 gemm2    241.8 total    675.2 us  err 4.6e-03
  gluon_split_tail=1                       gemm1    425.5 gemm2    246.5 total    692.6 us  err 4.6e-03

## gpt-oss-120b T=16384 (S=65536, H=2880, I=2880, E=128) rel_err 5.94e-03
  base                                     gemm1   3348.3 gemm2   1836.3 total   5517.2 us  err 5.9e-03
  gluon_split_tail=1                       FAILED ValueError: KernelConfig.gluon_split_tail: needs a Gluon GEMM
"""


def test_reads_each_points_base_line_only():
    assert ab_probe.parse_probe(PROBE_OUTPUT) == {
        "qwen3-30b-a3b:4096": (412.7, 241.8, 675.2),
        "gpt-oss-120b:16384": (3348.3, 1836.3, 5517.2),
    }
    assert ab_probe.parse_probe("Traceback (most recent call last):\n  RuntimeError: no CUDA") == {}


def test_trees_need_a_name_a_tilemoe_package_and_a_second_tree(tmp_path):
    src = Path(__file__).resolve().parents[2] / "src"
    assert ab_probe.parse_trees([f"main={src}", f"again={src}"]) == {"main": src, "again": src}
    with pytest.raises(ValueError, match="expected NAME=PATH, got 'src'"):
        ab_probe.parse_trees(["src", f"main={src}"])
    with pytest.raises(ValueError, match="holds no tilemoe package"):
        ab_probe.parse_trees([f"main={src}", f"old={tmp_path}"])
    with pytest.raises(ValueError, match="given twice"):
        ab_probe.parse_trees([f"main={src}", f"main={src}"])
    with pytest.raises(ValueError, match="at least two trees, got 1"):
        ab_probe.parse_trees([f"main={src}"])


def test_report_gives_medians_and_the_ratio_to_the_first_tree():
    point = "qwen3-30b-a3b:4096"
    rounds = [
        {"main": {point: (400.0, 240.0, 660.0)}, "old": {point: (410.0, 260.0, 690.0)}},
        {"main": {point: (402.0, 238.0, 662.0)}, "old": {point: (414.0, 262.0, 700.0)}},
        {"main": {point: (398.0, 242.0, 664.0)}, "old": {}},  # old's probe gave nothing this round
    ]
    lines = ab_probe.report(["main", "old"], rounds, [point, "mixtral-8x7b:1024"])
    assert lines[2] == "| qwen3-30b-a3b:4096 | main | 400.0 | 240.0 | 662.0 | 1.000x |"
    assert lines[3] == "| qwen3-30b-a3b:4096 | old | 412.0 | 261.0 | 695.0 | 1.050x |"
    assert lines[4] == "| mixtral-8x7b:1024 | main | - | - | - | no result |"


def test_arms_are_kernel_probe_options_on_this_checkout():
    arms = ab_probe.parse_arms(["random=--scenario random", "one=--scenario balanced --entry-tokens 4096", "plain="])
    assert arms == {"random": ["--scenario", "random"], "one": ["--scenario", "balanced", "--entry-tokens", "4096"],
                    "plain": []}  # fmt: skip
    assert ab_probe.probe_command(["qwen3-30b-a3b:4096"], arms["one"])[-4:] == arms["one"]
    with pytest.raises(ValueError, match="expected NAME=OPTIONS, got '--scenario'"):
        ab_probe.parse_arms(["--scenario"])
    with pytest.raises(ValueError, match="given twice"):
        ab_probe.parse_arms(["a=", "a=--scenario random"])
    # one arm is enough: its rounds' medians; the report names them arms
    point = "mixtral-8x7b:1028"
    lines = ab_probe.report(["one"], [{"one": {point: (1.0, 2.0, 3.0)}}], [point], "arm")
    assert lines[0].startswith("| point | arm |") and lines[2] == f"| {point} | one | 1.0 | 2.0 | 3.0 | 1.000x |"
