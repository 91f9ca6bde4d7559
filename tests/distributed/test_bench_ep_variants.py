"""``tilemoe bench --ep-size N --fused-variants ...``: parsing, row names, which layer and tiles each variant row
runs on, and which rows measure their communication columns (CPU: the fused rows themselves need CUDA)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from tilemoe.bench import distributed_runner as runner
from tilemoe.bench.distributed_runner import parse_fused_variants
from tilemoe.cli import main
from tilemoe.distributed.fused_ops import FusedTiles, overrides_label, parse_tiles_overrides

TINY = ["--device", "cpu", "--manual-config", "--num-experts", "8", "--num-experts-per-tok", "2",
        "--hidden-size", "32", "--intermediate-size", "16", "--benchmark-iters", "2"]  # fmt: skip


def test_parse_variants_labels_in_order():
    got = parse_fused_variants(["tma=1", "num_put=64", "num_put=128,tma=true", " put_split = 4 "], ["epmoe", "fused"])
    assert got == [
        ("tma=1", {"tma": True}),
        ("num_put=64", {"num_put": 64}),
        ("num_put=128,tma=1", {"num_put": 128, "tma": True}),  # bools written as 0 / 1
        ("put_split=4", {"put_split": 4}),
    ]
    assert parse_fused_variants(None, ["epmoe"]) == []
    assert overrides_label(parse_tiles_overrides("tma=0,block_m=64")) == "tma=0,block_m=64"


@pytest.mark.parametrize(
    ("specs", "impls", "match"),
    [
        (["tma=1"], ["epmoe"], "needs --impl ... fused"),  # variants of a path not asked for
        (["bogus=1"], ["fused"], "'bogus=1'.*FIELD one of"),  # unknown field, the fields listed
        (["num_put"], ["fused"], "not FIELD=VALUE"),  # no value
        (["tma=1,"], ["fused"], "expected FIELD=VALUE"),  # an empty item
        (["tma=yes"], ["fused"], "tma expects 0/1/true/false"),
        (["num_put=many"], ["fused"], "num_put expects an int"),
        (["block_m=48"], ["fused"], "FusedTiles.block_m: expected a power of two, got 48"),  # FusedTiles refuses
        (["put_split=0"], ["fused"], "FusedTiles.put_split"),
        (["num_put=0"], ["fused"], "FusedTiles.num_put: expected an int >= 1, got 0"),
        (["tma=1,tma=0"], ["fused"], "'tma' given twice"),
        (["tma=1", "tma=true"], ["fused"], "'tma=1' given twice"),  # the same variant spelt twice
    ],
)
def test_bad_variants_name_the_flag(specs, impls, match):
    with pytest.raises(ValueError, match="--fused-variants") as info:
        parse_fused_variants(specs, impls)
    assert info.match(match)


def test_bad_variant_on_the_command_line_exits_2(capsys):
    code = main(["bench", *TINY, "--ep-size", "2", "--impl", "epmoe", "fused", "--fused-variants", "nope=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--fused-variants" in err and "nope=1" in err
    assert main(["bench", *TINY, "--impl", "grouped", "--fused-variants", "tma=1"]) == 2  # no EP: refused
    assert "only with --ep-size" in capsys.readouterr().err


def _layer(tiles: FusedTiles):
    return SimpleNamespace(fused=SimpleNamespace(tiles=tiles, state=SimpleNamespace(tiles=tiles)))


def test_variant_rows_share_the_buffers_unless_a_sizing_field_changes():
    own = FusedTiles(block_m=64, num_stages1=2)
    base, built = _layer(own), []

    def build(tiles):
        built.append(tiles)
        return _layer(tiles)

    variants = parse_fused_variants(["tma=1", "num_put=128,put_split=2", "block_m=128"], ["fused"])
    rows = runner._variant_rows(base, variants, build)
    assert [name for name, _, _ in rows] == ["fused[tma=1]", "fused[num_put=128,put_split=2]", "fused[block_m=128]"]
    # the overrides go on top of the layer's tiles (block_m 64, 2 stages kept where not replaced)
    assert rows[0][1] is base and rows[0][2] == dataclasses.replace(own, tma=True)
    assert rows[1][2] == dataclasses.replace(own, num_put=128, put_split=2)
    assert rows[2][2] == dataclasses.replace(own, block_m=128) and rows[2][2].num_stages1 == 2
    # put_split and block_m size buffers: those variants get layers of their own
    assert rows[1][1] is not base and rows[2][1] is not base
    assert built == [rows[1][2], rows[2][2]]


def test_comm_columns_measured_once_per_distinct_communication(monkeypatch):
    """fused measures; fused-graph copies it; a GEMM-only variant (tma) copies fused; a put variant measures and
    its -graph row copies it; a FAILED row gets nothing."""
    own = FusedTiles()
    base = _layer(own)
    measured = []

    def fake_measure(p, layer, x, tw, ti, device, elem, row, *, tiles=None, sweep=True):
        measured.append((row["implementation"], tiles, sweep))
        for column in ("dispatch_combine_ms", "dispatch_combine_gbps", "dispatch_gbps", "combine_gbps"):
            row[column] = float(len(measured))

    monkeypatch.setattr(runner, "_fused_comm_columns", fake_measure)
    names = ["epmoe", "fused", "fused-graph", "fused[tma=1]", "fused[tma=1]-graph", "fused[num_put=64]",
             "fused[num_put=64]-graph", "fused[block_k2=32]"]  # fmt: skip
    rows = {n: {"implementation": n, "status": "OK", "nccl_a2a_gbps": 7.0} for n in names}
    rows["fused[block_k2=32]"]["status"] = "FAILED"
    tma, put64 = dataclasses.replace(own, tma=True), dataclasses.replace(own, num_put=64)
    row_layers = {n: base for n in names if n.startswith("fused")}
    k32 = dataclasses.replace(own, block_k2=32)
    row_tiles = {"fused[tma=1]": tma, "fused[tma=1]-graph": tma, "fused[num_put=64]": put64,
                 "fused[num_put=64]-graph": put64, "fused[block_k2=32]": k32}  # fmt: skip
    runner._all_fused_comm_columns({}, rows, row_layers, row_tiles, None, None, None, "cpu", 2)
    assert measured == [("fused", None, True), ("fused[num_put=64]", put64, False)]
    assert rows["fused-graph"]["dispatch_gbps"] == rows["fused"]["dispatch_gbps"] == 1.0
    assert rows["fused[tma=1]"]["dispatch_gbps"] == rows["fused[tma=1]-graph"]["combine_gbps"] == 1.0
    assert rows["fused[num_put=64]-graph"]["dispatch_gbps"] == 2.0
    assert all(rows[n]["nccl_a2a_gbps"] == 7.0 for n in names)
    assert "dispatch_gbps" not in rows["fused[block_k2=32]"]
