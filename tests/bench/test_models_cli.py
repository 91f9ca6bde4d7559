"""`tilemoe models`: table, markdown, json, one model by name or config.json path, errors."""

from __future__ import annotations

import json

import pytest

from tilemoe.bench import models_cli
from tilemoe.cli import build_parser, main
from tilemoe.hf_config import list_presets, load_config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["models", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_subcommand_is_registered():
    args = build_parser().parse_args(["models", "--format", "json", "--model", "deepseek-v3"])
    assert args.run is models_cli.run
    assert (args.format, args.model) == ("json", "deepseek-v3")


def test_json_lists_every_preset_with_its_numbers(capsys):
    rc, out, _ = run_cli(capsys, "--format", "json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list_presets()
    for row in rows:
        c = load_config(row["name"])
        assert (row["E"], row["K"], row["H"], row["I"]) == (
            c.num_experts,
            c.top_k,
            c.hidden_size,
            c.intermediate_size,
        )
        assert row["GFLOP/tok"] == round(c.flops_per_token() / 1e9, 4)
        assert row["weight MB/tok"] == round(c.weight_bytes_per_token(2) / 1e6, 2)
        assert row["routing"].startswith(c.routing)


def test_labels_for_shared_experts_routing_and_activation(capsys):
    rows = {r["name"]: r for r in json.loads(run_cli(capsys, "--format", "json")[1])}
    assert rows["qwen1.5-moe-a2.7b"]["shared"] == "1x5632+gate"
    assert rows["deepseek-v3"]["shared"] == "1x2048"
    assert rows["deepseek-v3"]["routing"] == "sigmoid_grouped_topk (norm, g4/8, bias, x2.5)"
    assert rows["mixtral-8x7b"]["shared"] == "-"
    assert rows["mixtral-8x7b"]["routing"] == "softmax_topk (norm)"
    assert rows["gpt-oss-20b"]["activation"] == "swigluoai(a=1.702, lim=7)"
    assert rows["llama4-scout"]["routing"] == "sigmoid_top1_input_scaled"


def test_markdown_table(capsys):
    rc, out, _ = run_cli(capsys, "--format", "markdown")
    lines = out.strip().splitlines()
    assert rc == 0
    assert lines[0] == "| " + " | ".join(models_cli.COLUMNS) + " |"
    assert lines[1].startswith("|---|---:|")
    assert len(lines) == 2 + len(list_presets())
    assert any(line.startswith("| mixtral-8x7b | 8 | 2 | 4096 | 14336 | - |") for line in lines)


def test_table_default_prints_every_preset(capsys):
    rc, out, _ = run_cli(capsys)
    assert rc == 0
    for name in list_presets():
        assert name in out


def test_plain_text_when_not_a_terminal(capsys):
    rc, out, _ = run_cli(capsys, "--model", "olmoe-1b-7b")
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    assert lines[0].split()[:5] == ["name", "E", "K", "H", "I"]
    assert lines[2].split()[:5] == ["olmoe-1b-7b", "64", "8", "2048", "1024"]


def test_rich_table_on_a_terminal(capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    rc, out, _ = run_cli(capsys, "--model", "olmoe-1b-7b")
    assert rc == 0
    assert "tilemoe presets" in out and "┏" in out and "2048" in out


def test_plain_text_without_rich(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr(models_cli, "_print_rich", lambda rows: False)
    rc, out, _ = run_cli(capsys, "--model", "mixtral-8x7b")
    assert rc == 0 and "┏" not in out
    assert out.strip().splitlines()[2].split()[:5] == ["mixtral-8x7b", "8", "2", "4096", "14336"]


def test_one_model_from_a_config_json(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "qwen3_moe",
                "hidden_size": 256,
                "moe_intermediate_size": 64,
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "norm_topk_prob": True,
            }
        )
    )
    rc, out, _ = run_cli(capsys, "--model", str(path), "--format", "json")
    assert rc == 0
    (row,) = json.loads(out)
    assert (row["E"], row["K"], row["H"], row["I"]) == (16, 4, 256, 64)
    assert row["GFLOP/tok"] == round((2 * 4 * 3 * 256 * 64 + 2 * 256 * 16) / 1e9, 4)


def test_unknown_model_is_a_clear_error(capsys):
    rc, out, err = run_cli(capsys, "--model", "not-a-model")
    assert rc == 2 and out == ""
    assert "tilemoe models: name_or_path: expected a preset" in err and "mixtral-8x7b" in err


def test_bad_format_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["models", "--format", "csv"])
    assert "invalid choice: 'csv'" in capsys.readouterr().err
