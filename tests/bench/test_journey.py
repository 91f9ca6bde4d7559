"""`tilemoe journey` at tiny sizes on CPU."""

from __future__ import annotations

import dataclasses

import pytest

from tilemoe.cli import main
from tilemoe.impls._registry import _REGISTRY

TINY = ["--manual-config", "--num-experts", "6", "--num-experts-per-tok", "2", "--hidden-size", "16"]
TINY += ["--intermediate-size", "8", "--warmup-iters", "1", "--benchmark-iters", "2"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMOE_CACHE_DIR", str(tmp_path / "cache"))
    # grouped_compiled compiles for seconds on CPU; it is tested in tests/impls/test_ladder.py. Here it
    # stands for a level that is not available on the device (shown as n/a).
    impl = _REGISTRY["grouped_compiled"]
    monkeypatch.setitem(_REGISTRY, "grouped_compiled", dataclasses.replace(impl, is_available=lambda: False))


def test_journey_tables(tmp_path, capsys):
    base = tmp_path / "journey"
    rc = main(["journey", *TINY, "--num-tokens", "1", "8", "--max-naive-tokens", "1", "--output-file", str(base)])
    assert rc == 0
    md = (tmp_path / "journey.md").read_text()
    assert "## Per level, 1 tokens" in md  # the largest token count level 0 ran at
    assert "| level | technique | time | speedup vs level 0 | change from previous | what it does |" in md
    assert "| 0 | naive |" in md and "| 4 | grouped |" in md and "| 6 | grouped_compiled | n/a |" in md
    assert "own torch_grouped_mm" in md or "torch_grouped_mm" not in md
    scale = md.split("## Scale")[1]
    row_8 = next(line for line in scale.splitlines() if line.startswith("| 8 |"))
    assert row_8.split("|")[2].strip() == "skipped"  # level 0 past --max-naive-tokens: skipped, not a time
    assert "ms" in row_8.split("|")[6]  # grouped has a time
    csv_text = (tmp_path / "journey.csv").read_text()
    assert csv_text.startswith("implementation,scenario,num_tokens,")
    out = capsys.readouterr().out
    assert "Per level" in out and "Scale" in out
