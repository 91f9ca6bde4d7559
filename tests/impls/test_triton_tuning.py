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
        assert pick_config(shape, torch.float16, "Test GPU 1") != forced or forced == tuning.heuristic_config(
            shape, torch.float16
        )
        assert pick_config(MoEShape(5000, 8, 2, 4096, 14336), torch.bfloat16, "Test GPU 1") != forced
    finally:
        tuning._load_table.cache_clear()


def test_bad_config_values():
    with pytest.raises(ValueError, match="block_n1"):
        KernelConfig(block_n1=8)
    with pytest.raises(ValueError, match="num_warps1"):
        KernelConfig(num_warps1=0)
    with pytest.raises(ValueError, match="unknown keys"):
        KernelConfig.from_dict({"block_mm": 16})
