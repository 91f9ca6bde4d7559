"""pick_config: pure, never missing, tables keyed by device and shape bucket."""

import json

import pytest
import torch

import tilemoe.tuning as tuning
from tilemoe.tuning import KernelConfig, MoEShape, pick_config, shape_key, token_bucket


@pytest.mark.parametrize("device", [None, "NVIDIA H100 80GB HBM3", "Some Future GPU"])
@pytest.mark.parametrize("tokens", [0, 1, 8, 100, 4096, 100000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_never_missing_and_pure(device, tokens, dtype):
    shape = MoEShape(tokens, 128, 8, 2048, 768)
    cfg = pick_config(shape, dtype, device)
    assert isinstance(cfg, KernelConfig)
    assert cfg == pick_config(shape, dtype, device)


def test_token_bucket():
    assert [token_bucket(t) for t in (0, 1, 2, 3, 64, 65, 20000)] == [1, 1, 2, 4, 64, 128, 16384]


def test_table_entry_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning._load_table.cache_clear()
    shape = MoEShape(50, 8, 2, 4096, 14336)
    forced = KernelConfig(block_m=32, block_n1=128, block_k1=32)
    path = tuning.table_path("Test GPU 1")
    path.write_text(
        json.dumps({"device": "Test GPU 1", "configs": {shape_key(shape, torch.bfloat16): forced.to_dict()}})
    )
    try:
        assert pick_config(shape, torch.bfloat16, "Test GPU 1") == forced
        assert pick_config(shape, torch.float16, "Test GPU 1") == forced  # fp16 takes the bf16 entries
        assert pick_config(shape, torch.float32, "Test GPU 1") == tuning.heuristic_config(shape, torch.float32)
        assert pick_config(MoEShape(5000, 8, 2, 4096, 14336), torch.bfloat16, "Test GPU 1") != forced
    finally:
        tuning._load_table.cache_clear()


def _write_table(tmp_path, monkeypatch, device: str, entries: dict) -> None:
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning._load_table.cache_clear()
    configs = {key: cfg.to_dict() for key, cfg in entries.items()}
    tuning.table_path(device).write_text(json.dumps({"device": device, "configs": configs}))


@pytest.fixture
def _fresh_tables():
    yield
    tuning._load_table.cache_clear()


@pytest.mark.usefixtures("_fresh_tables")
def test_nearest_tuned_token_count_stands_in_for_a_missing_bucket(tmp_path, monkeypatch):
    """Only T = 8, 64, 1024 and 4096 tuned for the layer (the tuner's default skips 16, 32, 128, ..., 8192): a T whose
    bucket has no entry takes the entry tuned nearest to it in factors of two, ties to the smaller; beyond two
    octaves of every entry, or for another layer or dtype, the heuristic."""
    layer = (8, 2, 4096, 14336)
    tuned = {t: KernelConfig(block_m=16 << i, block_n1=32 << i) for i, t in enumerate((8, 64, 1024, 4096))}
    entries = {shape_key(MoEShape(t, *layer), torch.bfloat16): cfg for t, cfg in tuned.items()}
    _write_table(tmp_path, monkeypatch, "Test GPU 2", entries)

    def picked(num_tokens, dtype=torch.bfloat16, experts=8):
        return pick_config(MoEShape(num_tokens, experts, *layer[1:]), dtype, "Test GPU 2")

    expected = {
        2: 8, 8: 8, 12: 8, 16: 8,  # 2 is 2 octaves from 8; bucket 16: 8 is 1 octave away, 64 is 2
        20: 8, 22: 8, 23: 64, 32: 64,  # bucket 32: the nearer of 8 and 64 in log2(T) (22.6 is the middle)
        100: 64, 128: 64,  # bucket 128: 64 and 256 (untuned) ... 1024 is 3 octaves from 128
        512: 1024, 700: 1024,  # bucket 512 / 1024: 64 is 3 octaves from 512, 1024 is 1
        2048: 1024, 3000: 4096, 5000: 4096, 8192: 4096,  # bucket 2048: a tie goes to the smaller; 8192: 4096
        16384: 4096,  # 16384 is 2 octaves from 4096
    }  # fmt: skip
    for num_tokens, source in expected.items():
        assert picked(num_tokens) == tuned[source], num_tokens

    def untuned(num_tokens, dtype=torch.bfloat16, experts=8):  # what a GPU without a table gets
        return pick_config(MoEShape(num_tokens, experts, *layer[1:]), dtype, "Tableless GPU")

    for num_tokens in (1, 20000):  # more than two octaves from 8 / 4096: the heuristic / the grouped-GEMM rule
        assert picked(num_tokens) == untuned(num_tokens), num_tokens
    assert picked(2048, torch.float32) == untuned(2048, torch.float32)  # another dtype
    assert picked(2048, torch.float16) == tuned[1024]  # fp16: the bf16 entries stand in
    assert picked(2048, experts=16) == untuned(2048, experts=16)  # another layer


@pytest.mark.usefixtures("_fresh_tables")
def test_a_decode_entry_stands_in_only_below_its_token_count(tmp_path, monkeypatch):
    layer = (128, 8, 2048, 768)
    decode = KernelConfig(block_m=16, decode=True)
    tiled = KernelConfig(block_m=32)
    keys = {t: shape_key(MoEShape(t, *layer), torch.bfloat16) for t in (8, 64)}
    _write_table(tmp_path, monkeypatch, "Test GPU 3", {keys[8]: decode, keys[64]: tiled})

    def picked(num_tokens):
        return pick_config(MoEShape(num_tokens, *layer), torch.bfloat16, "Test GPU 3")

    assert picked(2) == picked(8) == decode
    heuristic = tuning.heuristic_config(MoEShape(12, *layer), torch.bfloat16)
    assert picked(12) == heuristic  # 8's decode entry not above T = 8; 64 is 2.4 octaves away
    assert picked(20) == tiled  # 64 is 1.7 octaves from 20


def test_fp16_takes_the_nearest_of_its_own_and_the_bf16_entries():
    def key(num_tokens, dtype):
        return shape_key(MoEShape(num_tokens, 8, 2, 4096, 14336), dtype)

    bf16, fp16 = KernelConfig(block_m=64), KernelConfig(block_m=128)
    table = {key(1024, torch.bfloat16): bf16}
    assert tuning.table_entry(table, key(1024, torch.float16), 1024) == bf16
    table[key(4096, torch.float16)] = fp16  # fp16's own, 2 octaves away: the bf16 entry at T is nearer
    assert tuning.table_entry(table, key(1024, torch.float16), 1024) == bf16
    assert tuning.table_entry(table, key(4096, torch.float16), 4096) == fp16
    table[key(1024, torch.float16)] = fp16  # at the same T, its own dtype
    assert tuning.table_entry(table, key(1024, torch.float16), 1024) == fp16
    assert tuning.table_entry(table, key(1024, torch.bfloat16), 1024) == bf16  # bf16 never takes fp16's
    assert tuning.table_entry(table, key(1024, torch.float32), 1024) is None


def test_device_table_remembers_its_look_ups_within_a_bound():
    layer = (8, 2, 4096, 14336)
    entries = {shape_key(MoEShape(t, *layer), torch.bfloat16): KernelConfig(block_m=16 << i) for i, t in
               enumerate((8, 64, 1024))}  # fmt: skip
    table = tuning._DeviceTable(entries)
    table.MAX_REMEMBERED = 2
    for num_tokens in (10, 2000, 10, 100000, 700):
        key = shape_key(MoEShape(num_tokens, *layer), torch.bfloat16)
        assert table.entry_key(key, num_tokens) == tuning.table_entry_key(entries, key, num_tokens)
        assert len(table._entries) <= 2
    assert table.entry_key(shape_key(MoEShape(100000, *layer), torch.bfloat16), 100000) is None


@pytest.mark.usefixtures("_fresh_tables")
def test_config_source_names_the_entry_or_the_rule(tmp_path, monkeypatch):
    layer = (8, 2, 4096, 14336)
    key = shape_key(MoEShape(1024, *layer), torch.bfloat16)
    _write_table(tmp_path, monkeypatch, "Test GPU 4", {key: KernelConfig(block_m=64)})
    assert tuning.config_source(MoEShape(1024, *layer), torch.bfloat16, "Test GPU 4") == key
    assert tuning.config_source(MoEShape(1500, *layer), torch.float16, "Test GPU 4") == key  # stands in
    assert tuning.config_source(MoEShape(20000, *layer), torch.bfloat16, "Test GPU 4") == "grouped_mm rule"
    assert tuning.config_source(MoEShape(20000, *layer), torch.bfloat16, None) == "heuristic"


@pytest.mark.usefixtures("_fresh_tables")
def test_another_form_of_the_same_gpu_takes_its_table(tmp_path, monkeypatch):
    """An "NVIDIA H100 PCIe" has no table of its own: the "NVIDIA H100 80GB HBM3" one (same first two words) stands in;
    its own table, once tuned, wins; another model's name does not match."""
    shape = MoEShape(1024, 8, 2, 4096, 14336)
    sxm, pcie = KernelConfig(block_m=64), KernelConfig(block_m=128)
    _write_table(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3", {shape_key(shape, torch.bfloat16): sxm})
    assert tuning.same_model_table_path("NVIDIA H100 PCIe") == tuning.table_path("NVIDIA H100 80GB HBM3")
    assert tuning.same_model_table_path("NVIDIA H200") is None and tuning.same_model_table_path("H100") is None
    assert pick_config(shape, torch.bfloat16, "NVIDIA H100 PCIe") == sxm
    key = shape_key(shape, torch.bfloat16)
    assert tuning.config_source(shape, torch.bfloat16, "NVIDIA H100 PCIe") == f"{key} in NVIDIA H100 80GB HBM3's table"
    assert tuning.config_source(shape, torch.bfloat16, "NVIDIA H100 80GB HBM3") == key
    assert pick_config(shape, torch.bfloat16, "NVIDIA H800") == pick_config(shape, torch.bfloat16, "Tableless GPU")
    tuning.table_path("NVIDIA H100 PCIe").write_text(
        json.dumps({"device": "NVIDIA H100 PCIe", "configs": {key: pcie.to_dict()}})
    )
    tuning._load_table.cache_clear()
    assert pick_config(shape, torch.bfloat16, "NVIDIA H100 PCIe") == pcie


def test_table_entry_on_keys_without_a_bucket():
    cfg = KernelConfig()
    assert tuning.table_entry({"key0": cfg}, "key0", 10) == cfg
    assert tuning.table_entry({"key0": cfg}, "key1", 10) is None


def test_every_shipped_table_serves_every_power_of_two(monkeypatch):
    """The shipped tables tune T = 1, 2, 4, 8, 64, ..., 16384: with the nearest-entry rule every other power of two of
    the bench's models finds an entry too (before, 16 ... 8192 fell to the heuristic)."""
    tuning._load_table.cache_clear()
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        table = tuning._load_table(device)
        for layer in ((128, 8, 2048, 768), (64, 6, 2048, 1408), (128, 4, 2880, 2880), (8, 2, 4096, 14336)):
            for num_tokens in (1 << i for i in range(15)):
                key = shape_key(MoEShape(num_tokens, *layer), torch.bfloat16)
                assert tuning.table_entry(table, key, num_tokens) is not None, (device, layer, num_tokens)


def test_bad_config_values():
    with pytest.raises(ValueError, match="block_n1"):
        KernelConfig(block_n1=8)
    with pytest.raises(ValueError, match="num_warps1"):
        KernelConfig(num_warps1=0)
    with pytest.raises(ValueError, match="unknown keys"):
        KernelConfig.from_dict({"block_mm": 16})


def test_kernel_config_changes_name_the_fields_off_the_base():
    cfg = KernelConfig(block_m=128, tma=True, sorted_x=True)
    assert cfg.changes() == {"block_m": 128, "tma": True, "sorted_x": True}
    assert cfg.changes(KernelConfig(block_m=128, tma=True)) == {"sorted_x": True}
    assert cfg.changes(cfg) == {}
