"""The Gluon expert GEMMs (``KernelConfig.gluon``): against the float64 reference in bf16 / fp16 on a Hopper GPU, and
on the CPU the fallback to the Triton kernels (the interpreter cannot run Gluon). That they compile for sm_90 with
this machine's Triton is tests/bench/test_compile_check.py's."""

import dataclasses
import os

import pytest
import torch

import tilemoe.ops.fused_experts
from tilemoe.bench.timing import capture_graph
from tilemoe.config import MoEConfig
from tilemoe.testing import (
    assert_close,
    assert_replays_follow_new_inputs,
    make_input,
    make_routing,
    make_weights,
    reference_experts,
)
from tilemoe.tuning import KernelConfig

# (block_m, block_n1, block_k1, warps1, stages1, block_n2, block_k2, warps2, stages2, persistent1, persistent,
#  gate_up_dot, expert_groups: the tiles expert by expert, 2 blocks of one expert at a time)
GLUON_TILES = [
    (128, 128, 64, 8, 4, 128, 64, 8, 4, False, False, False, False),  # two 128 x 128 accumulators, two warpgroups
    (128, 128, 64, 8, 4, 256, 64, 8, 3, True, True, True, True),  # N = 256 wgmmas (gate | up, GEMM 2); persistent
    (64, 128, 64, 4, 4, 128, 64, 4, 4, True, False, True, False),  # one warpgroup, 64 rows, a [64, 256] accumulator
    (64, 64, 64, 8, 3, 64, 64, 8, 2, False, True, False, True),  # 8 warps on 64 rows (side by side along N), 2 stages
]


def gluon_config(tiles) -> KernelConfig:
    bm, bn1, bk1, w1, s1, bn2, bk2, w2, s2, p1, p2, gate_up, expert_groups = tiles
    return KernelConfig(block_m=bm, block_n1=bn1, block_k1=bk1, num_warps1=w1, num_stages1=s1, block_n2=bn2,
                        block_k2=bk2, num_warps2=w2, num_stages2=s2, tma=True, gluon=True, persistent1=p1,
                        persistent=p2, gate_up_dot=gate_up, expert_groups=expert_groups,
                        group_m1=2 if expert_groups else 8, group_m2=2 if expert_groups else 8)  # fmt: skip


def _run(config, num_tokens, kc, dtype, device, seed, deterministic=False, hot_expert=None):
    gen = torch.Generator().manual_seed(seed)
    w = make_weights(config, dtype=dtype, device=device, generator=gen)
    x = make_input(num_tokens, config, dtype=dtype, device=device, generator=gen)
    tw, ti = make_routing(num_tokens, config, device=device, generator=gen, hot_expert=hot_expert)
    if config.weights_on_input:  # weights other than 1: the scaling is seen
        tw = tw * torch.rand(tw.shape, generator=gen).to(device)
    out = tilemoe.ops.fused_experts.fused_experts(
        x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kc,
        deterministic=deterministic,
    )  # fmt: skip
    return out, reference_experts(x, w, tw, ti, config)


def test_gluon_config_checks():
    with pytest.raises(ValueError, match="gluon: needs tma=True"):
        KernelConfig(block_m=64, gluon=True)
    with pytest.raises(ValueError, match="block_m >= 64"):
        KernelConfig(block_m=32, tma=True, gluon=True)
    with pytest.raises(ValueError, match="num_warps1 4 or 8, got 2"):
        KernelConfig(block_m=64, tma=True, gluon=True, num_warps1=2)
    with pytest.raises(ValueError, match="num_stages2 >= 2"):
        KernelConfig(block_m=64, tma=True, gluon=True, num_stages2=1)
    with pytest.raises(ValueError, match="not with one_launch or gemm1_clears_out"):
        KernelConfig(block_m=64, tma=True, gluon=True, gemm1_clears_out=True)
    with pytest.raises(ValueError, match="gluon2: needs tma=True"):
        KernelConfig(block_m=64, gluon2=True)
    with pytest.raises(ValueError, match="not with gluon"):
        KernelConfig(block_m=64, tma=True, gluon=True, gluon2=True)
    with pytest.raises(ValueError, match="gluon2: expected block_m >= 64"):
        KernelConfig(block_m=64, tma=True, gluon2=True, one_launch=True)
    with pytest.raises(ValueError, match="pingpong1: needs that GEMM in Gluon"):
        KernelConfig(block_m=64, tma=True, gluon2=True, persistent1=True, num_warps1=8, pingpong1=True)
    with pytest.raises(ValueError, match="pingpong2: needs .* num_warps2=8"):
        KernelConfig(block_m=64, tma=True, gluon2=True, persistent=True, num_warps2=4, pingpong2=True)
    with pytest.raises(ValueError, match="pingpong2: needs .* persistent=True"):
        KernelConfig(block_m=64, tma=True, gluon=True, num_warps2=8, pingpong2=True)
    KernelConfig(block_m=64, tma=True, gluon2=True, persistent=True, num_warps2=8, pingpong2=True)
    with pytest.raises(ValueError, match="gluon_gather: needs the Gluon GEMM 1"):
        KernelConfig(block_m=64, tma=True, gluon2=True, gluon_gather=True)
    with pytest.raises(ValueError, match="gate_up_dot: the Gluon GEMM 1 splits"):  # 8 warps side by side on 64 rows
        KernelConfig(block_m=64, tma=True, gluon1=True, gate_up_dot=True, num_warps1=8)
    with pytest.raises(ValueError, match="gluon1: GEMM 1 alone"):
        KernelConfig(block_m=64, tma=True, gluon1=True, gluon2=True)
    with pytest.raises(ValueError, match="gluon1: expected block_m >= 64"):
        KernelConfig(block_m=64, tma=True, gluon1=True, gemm1_clears_out=True)
    KernelConfig(block_m=64, tma=True, gluon1=True, gluon_gather=True, persistent1=True, num_warps1=8, pingpong1=True)
    with pytest.raises(ValueError, match="async_combine: needs GEMM 2 in Gluon"):
        KernelConfig(block_m=64, tma=True, gluon1=True, persistent=True, async_combine=True)
    with pytest.raises(ValueError, match="async_combine: .* got .* persistent=False"):
        KernelConfig(block_m=64, tma=True, gluon2=True, async_combine=True)
    with pytest.raises(ValueError, match="async_combine: .* pingpong2=True"):
        KernelConfig(block_m=64, tma=True, gluon2=True, persistent=True, num_warps2=8, pingpong2=True,
                     async_combine=True)  # fmt: skip
    KernelConfig(block_m=64, tma=True, gluon2=True, persistent=True, async_combine=True)


def test_gluon_runs_only_where_it_can(monkeypatch):
    """``_gluon_ready``: 16-bit operands, a Hopper GPU (on the CPU only compile_check's stand-in), TMA-readable rows."""
    import tilemoe.ops._fused_experts_launch as launch

    kc = gluon_config(GLUON_TILES[0])
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    w13, w2 = torch.zeros(3, 256, 256, dtype=torch.bfloat16), torch.zeros(3, 256, 128, dtype=torch.bfloat16)
    assert not launch._gluon_ready(x, w13, w2, kc)  # a CPU tensor: the interpreter takes the Triton kernels
    monkeypatch.setattr(launch, "GLUON_COMPILE_ONLY", True)
    assert launch._gluon_ready(x, w13, w2, kc)
    assert not launch._gluon_ready(x.float(), w13.float(), w2.float(), kc)  # fp32: 3xTF32 in the Triton kernels
    odd = torch.zeros(3, 256, 100, dtype=torch.bfloat16)  # rows of 200 bytes: not 16-byte aligned for TMA
    assert not launch._gluon_ready(x, torch.zeros(3, 200, 256, dtype=torch.bfloat16), odd, kc)
    assert not launch._gluon_ready(x, w13.transpose(1, 2), w2, kc)  # not contiguous


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's fallback (CPU suite)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_falls_back_to_the_triton_kernels_in_the_interpreter(dtype):
    """Every Gluon form (both GEMMs, one of them, ping-pong, the gather, the combine's own warps) runs the Triton
    kernels here, its tiles."""
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=64, intermediate_size=48)
    for kc in (gluon_config(GLUON_TILES[2]), _GLUON2_PP, _GLUON1, _GATHER_PP, _GLUON2_COMBINE):
        out, ref = _run(config, 7, kc, dtype, "cpu", seed=1)
        assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_falls_back_to_the_triton_kernels_for_fp32():
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=256, intermediate_size=128)
    out, ref = _run(config, 300, gluon_config(GLUON_TILES[2]), torch.float32, "cuda", seed=1)
    assert_close(out, ref, torch.float32)


# Shapes: real models' H / I with 8 experts (qwen3-30b-a3b, deepseek-like I = 1408 not a multiple of 128, gpt-oss's
# bias and swigluoai with H = I = 2880 not a multiple of 64), a plain MLP (not gated), Llama 4's weights on the input.
GPU_SHAPES = [
    dict(hidden_size=2048, intermediate_size=768, top_k=8),
    dict(hidden_size=4096, intermediate_size=1408, top_k=2),
    dict(hidden_size=2880, intermediate_size=2880, top_k=4, activation="swigluoai", expert_bias=True),
    dict(hidden_size=512, intermediate_size=256, top_k=2, activation="gelu", gated=False),
    dict(hidden_size=512, intermediate_size=128, top_k=1, activation="gelu", routing="sigmoid_top1_input_scaled"),
]


def _assert_gpu_shapes_match(kc):
    """Every GPU shape at T = 1 (one tile), 300 (tails), 1000 with a hot expert (one expert takes most rows: many
    tiles of one expert); the atomic combine and the deterministic per-slot one."""
    failures = []
    for i, shape in enumerate(GPU_SHAPES):
        config = MoEConfig(num_experts=8, **shape)
        for t in (1, 300, 1000):
            for deterministic in (False, True):
                out, ref = _run(config, t, kc, torch.bfloat16, "cuda", seed=t + i, deterministic=deterministic,
                                hot_expert=0 if t == 1000 else None)  # fmt: skip
                try:
                    assert_close(out, ref, torch.bfloat16)
                except AssertionError as error:
                    failures.append(f"{shape} T={t} det={deterministic}: {str(error).splitlines()[0][:160]}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", GLUON_TILES)
def test_gluon_gemms_bf16(tiles):
    _assert_gpu_shapes_match(gluon_config(tiles))


# Two MMA warpgroups taking a program's tiles in turn (``pingpong1`` / ``pingpong2``), and GEMM 2 alone in Gluon after
# the Triton GEMM 1 (``gluon2``: its act rows past a split tail's real rows are never written, so GEMM 2 reads
# garbage there and must not store it).
_PP = dict(block_k1=64, block_k2=64, num_warps1=8, num_warps2=8, tma=True, persistent=True)
# both GEMMs ping-pong: [128, 2 x 64] (gate | up) and [128, 128] per warpgroup; tiles expert by expert
_PP_BOTH = KernelConfig(block_m=128, block_n1=64, num_stages1=4, block_n2=128, num_stages2=4, gluon=True,
                        persistent1=True, gate_up_dot=True, pingpong1=True, pingpong2=True, expert_groups=True,
                        group_m1=2, group_m2=2, **_PP)  # fmt: skip
# two accumulators per warpgroup ([64, 64] each), GEMM 2 [64, 256], 2 stages (the ring wraps every other step)
_PP_BM64 = KernelConfig(block_m=64, block_n1=64, num_stages1=2, block_n2=256, num_stages2=2, gluon=True,
                        persistent1=True, pingpong1=True, pingpong2=True, **_PP)  # fmt: skip
# Triton GEMM 1 with split tails, then the ping-pong Gluon GEMM 2
_GLUON2_PP = KernelConfig(block_m=128, block_n1=128, num_stages1=4, block_n2=128, num_stages2=4, split_tail=True,
                          gluon2=True, pingpong2=True, **_PP)  # fmt: skip
# Triton GEMM 1 (gathered x), then the cooperative Gluon GEMM 2 (8 warps on [128, 256])
_GLUON2 = KernelConfig(block_m=128, block_n1=128, num_stages1=4, block_n2=256, num_stages2=3, gluon2=True, **_PP)
# GEMM 1 gathering x's rows by token (cp.async from a producer warpgroup), no sorted copy: 8 warps on [128, 2 x 128],
# and with both GEMMs ping-pong
_GATHER = KernelConfig(block_m=128, block_n1=128, num_stages1=4, block_n2=256, num_stages2=3, gluon=True,
                       gluon_gather=True, gate_up_dot=True, persistent1=True, **_PP)  # fmt: skip
_GATHER_PP = dataclasses.replace(_PP_BOTH, gluon_gather=True)
# GEMM 1 alone in Gluon (gathering x), then the Triton GEMM 2 with split tails (its half tiles read act rows the Gluon
# GEMM 1 wrote in full blocks)
_GLUON1 = dataclasses.replace(_GATHER, gluon=False, gluon1=True, split_tail=True, persistent=False)
# GEMM 2's combine in warps of its own (``async_combine``): after the gathering GEMM 1 on [128, 256] tiles, expert by
# expert; after the Triton GEMM 1 with split tails on [64, 128] tiles, 2 ring stages (the stage handed over every tile)
_COMBINE = dataclasses.replace(_GATHER, async_combine=True, expert_groups=True, group_m2=4)
_GLUON2_COMBINE = KernelConfig(block_m=64, block_n1=128, num_stages1=3, block_n2=128, num_stages2=2, split_tail=True,
                               gluon2=True, async_combine=True, **_PP)  # fmt: skip
# GEMM 2's tiles by column groups (``col_group2``; 2 and 3 of the shapes' 4-23 column blocks, the last group narrower
# where they do not divide): the Gluon GEMM 2 after the Triton GEMM 1, ping-pong, with the async combine, and the
# persistent Triton GEMM 2
_COLUMNS_GLUON2 = dataclasses.replace(_GLUON2, col_group2=2)
_COLUMNS_PP = dataclasses.replace(_GLUON2_PP, col_group2=3)
_COLUMNS_COMBINE = dataclasses.replace(_COMBINE, col_group2=3)
_COLUMNS_TRITON = KernelConfig(block_m=128, block_n1=128, num_stages1=4, block_n2=256, num_stages2=3, col_group2=2,
                               **_PP)  # fmt: skip
PINGPONG_CONFIGS = [_PP_BOTH, _PP_BM64, _GLUON2_PP, _GLUON2, _GATHER, _GATHER_PP, _GLUON1, _COMBINE, _GLUON2_COMBINE,
                    _COLUMNS_GLUON2, _COLUMNS_PP, _COLUMNS_COMBINE, _COLUMNS_TRITON]  # fmt: skip
PINGPONG_IDS = [
    "pingpong-both",
    "pingpong-bm64",
    "gluon2-pingpong",
    "gluon2",
    "gather",
    "gather-pingpong",
    "gluon1",
    "combine",
    "gluon2-combine",
    "columns-gluon2",
    "columns-pingpong",
    "columns-combine",
    "columns-triton",
]


@pytest.mark.gpu
@pytest.mark.parametrize("kc", PINGPONG_CONFIGS, ids=PINGPONG_IDS)
def test_ping_pong_and_gluon2_bf16(kc):
    """T = 1 leaves the second warpgroup no tile; T = 1000 with a hot expert gives ~8 tiles per program, so the turns
    go round many times."""
    _assert_gpu_shapes_match(kc)


@pytest.mark.gpu
@pytest.mark.parametrize("kc", [_GATHER, _GATHER_PP, _GLUON1], ids=["gather", "gather-pingpong", "gluon1"])
def test_gather_with_hidden_not_a_multiple_of_the_k_box(kc):
    """H = 968 (not a multiple of 64: the last k step's copies masked past H), top-1 and top-6 routings."""
    for top_k, t in ((1, 77), (6, 513)):
        config = MoEConfig(num_experts=6, top_k=top_k, hidden_size=968, intermediate_size=320)
        out, ref = _run(config, t, kc, torch.bfloat16, "cuda", seed=t)
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(("kc", "tokens"), [(gluon_config(GLUON_TILES[0]), (64, 2048)), (_PP_BOTH, (64, 4096)),
                                           (_COMBINE, (64, 4096))],
                         ids=["cooperative", "pingpong-both", "combine"])  # fmt: skip
def test_gluon_gemms_fp16_and_many_experts(kc, tokens):
    # fp16 descriptors; E = 128 (qwen3's) with some experts taking no rows, T past one tile per expert
    config = MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768)
    for t in tokens:
        out, ref = _run(config, t, kc, torch.float16, "cuda", seed=t)
        assert_close(out, ref, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("kc", [gluon_config(GLUON_TILES[0]), _GLUON2_PP, _COMBINE],
                         ids=["cooperative", "gluon2-pingpong", "combine"])  # fmt: skip
def test_gluon_gemms_under_cuda_graph_replay(kc):
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=1024, intermediate_size=512)
    gen = torch.Generator().manual_seed(0)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
    x = make_input(256, config, dtype=torch.bfloat16, device="cuda", generator=gen)
    tw, ti = make_routing(256, config, device="cuda", generator=gen)

    graph, out = capture_graph(
        lambda: tilemoe.ops.fused_experts.fused_experts(x, w["w13"], w["w2"], tw, ti, config=config, kernel_config=kc)
    )
    assert_replays_follow_new_inputs(graph, out, x, w, tw, ti, config, gen, replays=3)
