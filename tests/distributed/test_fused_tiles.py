"""``fused_tiles_for``: the fused GEMM tiles follow the single-GPU tuner for the layer's shape at max_tokens."""

from __future__ import annotations

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed.fused_ops import STAGE_SMEM_BUDGET, FusedTiles, fused_tiles_for
from tilemoe.tuning import MoEShape, heuristic_config, pick_config

QWEN3 = MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768)


@pytest.mark.parametrize(
    ("config", "tokens", "device"),
    [
        (QWEN3, 1024, "NVIDIA H200"),  # a table hit (T*K/E = 64 rows per source and expert)
        (QWEN3, 8192, "NVIDIA H200"),  # no table bucket: the heuristic's large tiles
        (QWEN3, 128, None),  # no device: the heuristic (few rows per expert)
        (MoEConfig(num_experts=32, top_k=2, hidden_size=2048, intermediate_size=2048), 8192, "NVIDIA H200"),
    ],
)
def test_tiles_follow_pick_config(config, tokens, device):
    tiles = fused_tiles_for(config, tokens, torch.bfloat16, device)
    shape = MoEShape(tokens, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
    kc = pick_config(shape, torch.bfloat16, device)
    assert isinstance(tiles, FusedTiles)
    got = (tiles.block_m, tiles.block_n1, tiles.block_k1, tiles.num_warps1, tiles.block_n2, tiles.block_k2,
           tiles.num_warps2)  # fmt: skip
    # a split-tail entry (no such tiles in the fused kernels): half-height tiles when the average group fits one
    half = kc.split_tail and tokens * config.top_k <= config.num_experts * kc.block_m // 2
    block_m = kc.block_m // 2 if half else kc.block_m
    assert got == (block_m, kc.block_n1, kc.block_k1, kc.num_warps1, kc.block_n2, kc.block_k2, kc.num_warps2)
    stage1 = (tiles.block_m * tiles.block_k1 + 2 * tiles.block_k1 * tiles.block_n1) * 2
    assert 1 <= tiles.num_stages1 <= kc.num_stages1 and tiles.num_stages1 * stage1 <= STAGE_SMEM_BUDGET


def test_tiles_differ_by_tokens():
    """qwen3 at T = 1024 gets 64-row blocks (half the padding of the fixed 128): since session 5 the H200 entry there
    is a 128-row split-tail config, whose half-height tiles the fused path takes."""
    assert fused_tiles_for(QWEN3, 1024, torch.bfloat16, "NVIDIA H200").block_m == 64
    assert fused_tiles_for(QWEN3, 8192, torch.bfloat16, "NVIDIA H200").block_m == 128


def test_decode_config_falls_back_to_heuristic():
    """The H200 table picks the decode kernels for qwen3 at T = 8; the fused path has none: the heuristic."""
    shape = MoEShape(8, 128, 8, 2048, 768)
    assert pick_config(shape, torch.bfloat16, "NVIDIA H200").decode
    tiles = fused_tiles_for(QWEN3, 8, torch.bfloat16, "NVIDIA H200")
    h = heuristic_config(shape, torch.bfloat16)
    assert (tiles.block_m, tiles.block_n1, tiles.block_k2) == (h.block_m, h.block_n1, h.block_k2)


def test_stages_cut_to_the_shared_memory_budget(monkeypatch):
    """A smaller budget (100 KiB): the 128 x 128 x 64 bf16 two-accumulator stage (48 KiB) fits twice, GEMM 2's
    128 x 256 x 64 stage (48 KiB) twice; with a budget under one stage, still one stage."""
    from tilemoe.distributed import fused_ops

    config = MoEConfig(num_experts=32, top_k=2, hidden_size=2048, intermediate_size=2048)
    monkeypatch.setattr(fused_ops, "STAGE_SMEM_BUDGET", 100 * 1024)
    tiles = fused_tiles_for(config, 8192, torch.bfloat16, None)
    assert (tiles.block_m, tiles.block_n1, tiles.block_k1, tiles.block_n2) == (128, 128, 64, 256)
    assert (tiles.num_stages1, tiles.num_stages2) == (2, 2)
    monkeypatch.setattr(fused_ops, "STAGE_SMEM_BUDGET", 1024)
    tiles = fused_tiles_for(config, 8192, torch.bfloat16, None)
    assert (tiles.num_stages1, tiles.num_stages2) == (1, 1)


def test_tma_on_for_16_bit_dtypes_only():
    """TMA weights (and GEMM 2's input) made the fused forward 11-13% faster at T = 8192 on 2x H200 (bf16)."""
    config = MoEConfig(num_experts=32, top_k=2, hidden_size=2048, intermediate_size=2048)
    assert fused_tiles_for(config, 8192, torch.bfloat16, None).tma
    assert fused_tiles_for(config, 8192, torch.float16, None).tma
    assert not fused_tiles_for(config, 8192, torch.float32, None).tma


def test_split_tail_entry_halves_only_small_groups(monkeypatch):
    """A split-tail entry: half-height fused tiles while T*K/E fits half a block, the entry's own tiles above."""
    import tilemoe.tuning as tuning

    entry = heuristic_config(MoEShape(4096, 128, 8, 2048, 768), torch.bfloat16)  # 128-row tiles
    split = type(entry)(**{**entry.to_dict(), "split_tail": True})
    monkeypatch.setattr(tuning, "pick_config", lambda shape, dtype, device: split)
    assert fused_tiles_for(QWEN3, 1024, torch.bfloat16, "any").block_m == 64  # 64 rows per group
    assert fused_tiles_for(QWEN3, 1040, torch.bfloat16, "any").block_m == 128  # 65
    monkeypatch.setattr(tuning, "pick_config", lambda shape, dtype, device: entry)
    assert fused_tiles_for(QWEN3, 1024, torch.bfloat16, "any").block_m == 128  # no split: the entry's tiles
