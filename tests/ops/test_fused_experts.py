"""fused_experts (Triton; the interpreter on CPU) against the float64 reference, every option and edge case."""

import functools

import pytest
import torch
import triton
import triton.language as tl

import tilemoe.ops._fused_experts_launch as launch_module
import tilemoe.ops.fused_experts as fused_experts_module
from tilemoe.config import MoEConfig
from tilemoe.ops._kernels._fused_experts import _tile_coords
from tilemoe.ops.fused_experts import fused_experts, fused_experts_torch
from tilemoe.testing import assert_close, make_input, make_routing, make_weights, poison_launchers, reference_experts
from tilemoe.tuning import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's tl.dot is wrong for bf16: bf16 on the GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SMALL = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2, num_stages2=2)


def _spy(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records each return value; returns the list it fills."""
    real, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, name, wrapper)
    return seen


def _spy_launches(monkeypatch, name: str) -> list:
    """Record the keyword arguments of each launch (``kernel[grid](**kwargs)``) of the Triton kernel ``name`` in
    ``tilemoe.ops._kernels._fused_experts``; returns the list it fills."""
    import tilemoe.ops._kernels._fused_experts as kernels

    kernel, seen = getattr(kernels, name), []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, name, Spy())
    return seen


def _run_case(config, num_tokens, dtype, generator, *, hot_expert=None, kernel_config=None, deterministic=True):
    w = make_weights(config, dtype=dtype, device=DEVICE, generator=generator)
    x = make_input(num_tokens, config, dtype=dtype, device=DEVICE, generator=generator)
    topk_weights, topk_ids = make_routing(num_tokens, config, device=DEVICE, generator=generator, hot_expert=hot_expert)
    out = fused_experts(
        x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, b13=w["b13"], b2=w["b2"],
        kernel_config=kernel_config, deterministic=deterministic,
    )  # fmt: skip
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, reference_experts(x, w, topk_weights, topk_ids, config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64])
def test_shapes_and_dtypes(num_tokens, dtype, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24)
    _run_case(config, num_tokens, dtype, generator)


def test_many_tokens_top8_small_tiles(generator):
    config = MoEConfig(num_experts=10, top_k=8, hidden_size=48, intermediate_size=40)
    _run_case(config, 300, torch.float16, generator, kernel_config=SMALL)


@pytest.mark.parametrize("deterministic", [True, False])
def test_one_expert_takes_every_token(deterministic, generator):
    config = MoEConfig(num_experts=5, top_k=1, hidden_size=40, intermediate_size=24, routing="topk_softmax")
    _run_case(config, 37, torch.float32, generator, hot_expert=2, kernel_config=SMALL, deterministic=deterministic)


@pytest.mark.parametrize(
    "changes",
    [
        dict(activation="swigluoai", expert_bias=True, routing="topk_softmax"),
        dict(activation="gelu", gated=False),
        dict(activation="gelu_tanh", expert_bias=True),
        dict(activation="relu"),
        dict(routing="sigmoid_top1_input_scaled", top_k=1),
    ],
)
def test_activations_biases_input_scaling(changes, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24).replace(**changes)
    _run_case(config, 9, torch.float16, generator, kernel_config=SMALL, deterministic=False)


def test_deterministic_follows_torch_switch(monkeypatch, generator):
    # None (the default): the atomic combine, unless torch.use_deterministic_algorithms(True) asks for the
    # per-slot rows summed in order (sum_slots)
    config = MoEConfig(num_experts=5, top_k=3, hidden_size=32, intermediate_size=16)
    w = make_weights(config, dtype=torch.float16, device=DEVICE, generator=generator)
    x = make_input(11, config, dtype=torch.float16, device=DEVICE, generator=generator)
    tw, ti = make_routing(11, config, device=DEVICE, generator=generator)
    summed = _spy(monkeypatch, launch_module, "sum_slots")
    call = functools.partial(fused_experts, x, w["w13"], w["w2"], tw, ti, config=config, kernel_config=SMALL)
    ref = reference_experts(x, w, tw, ti, config)
    assert_close(call(), ref, torch.float16)
    assert summed == []
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = call()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
    assert len(summed) == 1
    assert_close(out, ref, torch.float16)
    assert torch.equal(call(deterministic=True), out)
    with pytest.raises(TypeError, match="deterministic"):
        call(deterministic="yes")


def test_torch_reference_matches(generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, expert_bias=True)
    w = make_weights(config, generator=generator)
    x = make_input(5, config, generator=generator)
    topk_weights, topk_ids = make_routing(5, config, generator=generator)
    out = fused_experts_torch(x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, b13=w["b13"], b2=w["b2"])
    assert_close(out, reference_experts(x, w, topk_weights, topk_ids, config), torch.float32)


def test_bad_arguments(generator):
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8)
    w = make_weights(config, generator=generator)
    x = make_input(3, config, generator=generator)
    tw, ti = make_routing(3, config, generator=generator)
    with pytest.raises(TypeError, match="topk_ids"):
        fused_experts(x, w["w13"], w["w2"], tw, ti.long(), config=config)
    with pytest.raises(ValueError, match="w13"):
        fused_experts(x, w["w13"][:, :4], w["w2"], tw, ti, config=config)
    with pytest.raises(TypeError, match="w2"):
        fused_experts(x, w["w13"], w["w2"].half(), tw, ti, config=config)
    with pytest.raises(TypeError, match="kernel_config"):
        fused_experts(x, w["w13"], w["w2"], tw, ti, config=config, kernel_config={"block_m": 16})
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(block_m=24)


@pytest.mark.parametrize("gated", [True, False])
def test_tile_multiples_take_the_unmasked_loop(gated, generator):
    # H and I multiples of every block of SMALL: EVEN_K and EVEN_N, the loads without masks
    config = MoEConfig(num_experts=3, top_k=2, hidden_size=64, intermediate_size=32, gated=gated, expert_bias=True)
    _run_case(config, 21, torch.float16, generator, kernel_config=SMALL)


# weights through TMA descriptors and/or a persistent grid (3 programs walking the tiles in the interpreter)
TMA = [
    dict(tma=True),
    dict(persistent=True),
    dict(tma=True, persistent=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", TMA)
@pytest.mark.parametrize(
    "hidden, inter, gated",
    [
        (48, 40, True),  # H, I not multiples of the 16/32 tiles: zero-filled boxes past H / I, masked stores
        (64, 32, True),  # multiples: the unmasked loop
        (40, 24, False),  # plain MLP: one weight box per k-step
    ],
)
def test_tma_and_persistent(options, hidden, inter, gated, dtype, generator, monkeypatch):
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=hidden, intermediate_size=inter, gated=gated,
                       expert_bias=True)  # fmt: skip
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2,
                       num_stages2=2, **options)  # fmt: skip
    built = _spy(monkeypatch, launch_module, "_tma_descriptor")
    _run_case(config, 45, dtype, generator, kernel_config=cfg)
    # the TMA runs really read the weights (both GEMMs) and GEMM 2's input through descriptors; the others
    # never build one
    assert [d is not None for d in built] == ([True, True, True] if cfg.tma else [])


@pytest.mark.parametrize("num_tokens", [0, 1])
def test_persistent_tma_tiny_batches(num_tokens, generator):
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=32, intermediate_size=16)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, tma=True, persistent=True)
    _run_case(config, num_tokens, torch.float32, generator, kernel_config=cfg)


def test_tma_falls_back_on_unaligned_rows(generator, monkeypatch):
    # H = 36 fp16: 72-byte rows are not 16-byte aligned, so the launcher takes the pointer loads
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=36, intermediate_size=20)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, tma=True, persistent=True)
    built = _spy(monkeypatch, launch_module, "_tma_descriptor")
    _run_case(config, 11, torch.float16, generator, kernel_config=cfg)
    assert built == [None, None, None]


def test_config_flags_are_bools():
    assert KernelConfig(tma=1).tma is True
    with pytest.raises(ValueError, match="tma"):
        KernelConfig(tma=2)


# the decode kernels: 16-row dots with row 0 the slot (bf16 on the GPU only, as every dot kernel)
DECODE = KernelConfig(block_n1=16, block_k1=32, block_n2=16, block_k2=32, decode=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 3, 9])
def test_decode_path(num_tokens, dtype, generator):
    # H, I not multiples of the 16/32 tiles; E = 7 not a power of two
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=24)
    _run_case(config, num_tokens, dtype, generator, kernel_config=DECODE)


@pytest.mark.parametrize(
    "changes",
    [
        dict(activation="swigluoai", expert_bias=True, routing="topk_softmax"),
        dict(activation="gelu", gated=False, expert_bias=True),
        dict(routing="sigmoid_top1_input_scaled", top_k=1),
        dict(top_k=1, routing="topk_softmax"),
    ],
)
def test_decode_path_options(changes, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24).replace(**changes)
    _run_case(config, 5, torch.float16, generator, kernel_config=DECODE)


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_decode_gemm2_per_slot_or_per_token(per_slot, num_tokens, generator, monkeypatch):
    # both forms of the decode GEMM 2 (per slot + slot sum: the default); bias and 3 k-steps per pick (I = 72)
    config = MoEConfig(num_experts=9, top_k=4, hidden_size=40, intermediate_size=72, expert_bias=True)
    monkeypatch.setattr(launch_module, "DECODE_GEMM2_PER_SLOT", per_slot)
    summed = _spy(monkeypatch, launch_module, "sum_slots")
    _run_case(config, num_tokens, torch.float32, generator, kernel_config=DECODE)
    assert len(summed) == per_slot


def test_decode_path_one_expert_takes_every_token(generator):
    config = MoEConfig(num_experts=5, top_k=1, hidden_size=32, intermediate_size=16, routing="topk_softmax")
    _run_case(config, 6, torch.float32, generator, hot_expert=4, kernel_config=DECODE)


def test_decode_path_several_k_steps_per_pick(generator):
    # I = 72: three 32-wide k-steps per pick in GEMM 2's flat (pick, k-step) loop; H = 100: four in GEMM 1
    config = MoEConfig(num_experts=9, top_k=4, hidden_size=100, intermediate_size=72, expert_bias=True)
    _run_case(config, 4, torch.float32, generator, kernel_config=DECODE)


# expert GEMMs through torch's grouped GEMM, the rest in Triton (few large experts with many rows each)
GROUPED_MM = KernelConfig(block_m=16, grouped_mm=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_grouped_mm_path(num_tokens, dtype, generator, monkeypatch):
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=48, intermediate_size=40)
    taken = _spy(monkeypatch, launch_module, "_launch_grouped_mm")
    _run_case(config, num_tokens, dtype, generator, kernel_config=GROUPED_MM)
    assert len(taken) == (num_tokens > 0)  # the path really ran (T = 0 returns before any launch)


@pytest.mark.parametrize(
    "changes",
    [
        dict(activation="swigluoai", expert_bias=True, routing="topk_softmax"),
        dict(activation="gelu", gated=False, expert_bias=True),
        dict(routing="sigmoid_top1_input_scaled", top_k=1),
    ],
)
def test_grouped_mm_path_options(changes, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24).replace(**changes)
    _run_case(config, 21, torch.float32, generator, kernel_config=GROUPED_MM)


def test_grouped_mm_path_one_expert_takes_every_token(generator):
    config = MoEConfig(num_experts=4, top_k=1, hidden_size=32, intermediate_size=16, routing="topk_softmax")
    _run_case(config, 19, torch.float32, generator, hot_expert=3, kernel_config=GROUPED_MM)


def test_pick_config_takes_grouped_mm_for_few_large_experts_without_a_table_entry(tmp_path, monkeypatch):
    import json

    from tilemoe import tuning
    from tilemoe.tuning import KernelConfig, MoEShape, pick_config, shape_key

    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning._load_table.cache_clear()
    try:
        gpu = "Test GPU without entries"
        mixtral = MoEShape(4096, 8, 2, 4096, 14336)
        assert pick_config(mixtral, torch.bfloat16, gpu).grouped_mm
        assert not pick_config(MoEShape(64, 8, 2, 4096, 14336), torch.bfloat16, gpu).grouped_mm
        assert not pick_config(MoEShape(4096, 128, 8, 2048, 768), torch.bfloat16, gpu).grouped_mm
        assert not pick_config(mixtral, torch.float32, gpu).grouped_mm
        assert not pick_config(mixtral, torch.bfloat16, None).grouped_mm  # CPU / interpreter: no grouped GEMM rule
        # a tuned entry wins over the rule (the tuner timed the grouped GEMM for that bucket too)
        tuned = KernelConfig(block_m=128, block_n1=128, block_n2=256, num_warps1=8, num_warps2=8, tma=True)
        gpu = "Test GPU with an entry"
        key = shape_key(mixtral, torch.bfloat16)
        tuning.table_path(gpu).write_text(json.dumps({"device": gpu, "configs": {key: tuned.to_dict()}}))
        assert pick_config(mixtral, torch.bfloat16, gpu) == tuned
    finally:
        tuning._load_table.cache_clear()


def _poison(monkeypatch) -> None:
    """Every buffer the launchers allocate starts as NaN (``tilemoe.testing.poison_launchers``)."""
    poison_launchers(monkeypatch.setattr)


# per-expert loads against block_m = 32 (half blocks of 16 rows): none, a tail of 1-16 rows (half tile), 17-31
# (full tile), exact multiples (no tail), two blocks and a tail of 1 row
SPLIT_COUNTS = [0, 3, 16, 17, 32, 45, 12, 65, 24, 26]


def _run_split_counts(cfg, dtype, generator, deterministic=True, counts=SPLIT_COUNTS, **config_changes):
    """fused_experts with ``cfg`` on a routing that gives the experts ``counts`` rows (every kind of tail), biases
    on, checked against the float64 reference. ``config_changes``: MoEConfig fields other than the defaults here."""
    from tilemoe.bench.scenarios import _ids_from_counts

    fields = dict(num_experts=len(counts), top_k=2, hidden_size=48, intermediate_size=40, expert_bias=True)
    config = MoEConfig(**{**fields, **config_changes})
    num_tokens = sum(counts) // config.top_k
    topk_ids = _ids_from_counts(counts, num_tokens, config.top_k, generator).to(DEVICE, torch.int32)
    topk_weights = torch.rand(num_tokens, config.top_k, generator=generator).to(DEVICE) + 0.1
    w = make_weights(config, dtype=dtype, device=DEVICE, generator=generator)
    x = make_input(num_tokens, config, dtype=dtype, device=DEVICE, generator=generator)
    out = fused_experts(
        x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, b13=w["b13"], b2=w["b2"],
        kernel_config=cfg, deterministic=deterministic,
    )  # fmt: skip
    assert_close(out, reference_experts(x, w, topk_weights, topk_ids, config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(tma=True),
        dict(persistent=True),  # GEMM 2 full tiles over GEMM 1's half tiles: the unwritten rows are never stored
        dict(tma=True, persistent=True),
        dict(persistent=True, persistent_tails=True),  # the persistent GEMM 2 runs half tiles too
        dict(tma=True, persistent=True, persistent_tails=True),
        dict(persistent1=True, persistent_tails=True),  # the persistent GEMM 1 runs half tiles, GEMM 2 one per tile
        dict(tma=True, persistent1=True, persistent=True, persistent_tails=True),  # both persistent, both split
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_split_tail(options, deterministic, dtype, generator, monkeypatch):
    cfg = KernelConfig(block_m=32, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       split_tail=True, **options)  # fmt: skip
    _poison(monkeypatch)
    built = _spy(monkeypatch, launch_module, "_tma_descriptor")
    gemm1 = _spy_launches(monkeypatch, "_gemm1_kernel")
    gemm2 = _spy_launches(monkeypatch, "_gemm2_kernel")
    _run_split_counts(cfg, dtype, generator, deterministic)
    # a persistent GEMM keeps the half tiles only with persistent_tails
    split1 = not cfg.persistent1 or cfg.persistent_tails
    split2 = not cfg.persistent or cfg.persistent_tails
    assert [k["SPLIT_TAIL"] for k in gemm1] == [split1] and [k["SPLIT_TAIL"] for k in gemm2] == [split2]
    # GEMM 1's half tiles leave their blocks' second halves unwritten (NaN from the poisoned buffer); full tiles write
    # every row (padding rows from token 0), the persistent loop's included
    act, used = gemm1[0]["act_ptr"], int(gemm1[0]["num_padded_ptr"])
    assert bool(act[:used].isnan().any()) == split1
    # with TMA, GEMM 2's half tiles read act through their own [16, 16] boxes
    expected = [True, True, True, True] if cfg.tma and split2 else [True, True, True] if cfg.tma else []
    assert [d is not None for d in built] == expected
    if cfg.tma and split2:
        assert built[-1].block_shape == [16, 16]


# against block_m = 32: SPLIT_COUNTS' tails (45 = 32 + 13 and 65 = 64 + 1 fold into the block before; 3, 16 and 12
# are single blocks, 12 right after 45's folded tail, so nothing to fold into), a tail of exactly half a block after a
# full one (48: folds) and one of a row more (50: does not)
FOLD_COUNTS = [*SPLIT_COUNTS, 48, 50]
# GEMM 1 dense (x_sorted through TMA, one [gate | up] dot), both GEMMs persistent, split tails kept in the loops
EVERY_FORM = dict(tma=True, sorted_x=True, gate_up_dot=True, persistent1=True, persistent=True, split_tail=True)
EVERY_FORM["persistent_tails"] = True


def _run_poisoned(monkeypatch, cfg, dtype, generator, deterministic, counts, **model):
    """``_run_split_counts`` with every launcher buffer poisoned (NaN) and both Triton GEMMs' launches recorded:
    (GEMM 1's launches, GEMM 2's, [blocks in use, block_m] bool of the act rows GEMM 1 left unwritten)."""
    _poison(monkeypatch)
    gemm1 = _spy_launches(monkeypatch, "_gemm1_kernel")
    gemm2 = _spy_launches(monkeypatch, "_gemm2_kernel")
    _run_split_counts(cfg, dtype, generator, deterministic, counts=counts, **model)
    used = int(gemm1[0]["num_padded_ptr"])
    unwritten = gemm1[0]["act_ptr"][:used].isnan().any(dim=1).view(-1, cfg.block_m).cpu()
    return gemm1, gemm2, unwritten


def _folded_blocks(sorted_ids, expert_ids, used_blocks: int, num_slots: int, block_m: int) -> list[int]:
    """The blocks FOLD_TAILS folds into the block before, worked out on the host from the alignment."""
    half = sorted_ids.view(-1, block_m)[:used_blocks, block_m // 2].cpu()
    experts = expert_ids[:used_blocks].cpu()
    return [b for b in range(1, used_blocks) if experts[b] == experts[b - 1] and half[b] >= num_slots]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options,model",
    [
        (dict(), dict()),
        (dict(tma=True), dict()),  # GEMM 2 reads the folded rows through its own [16, 16] boxes of act
        (dict(tma=True, sorted_x=True), dict()),  # GEMM 1 too, of x_sorted
        (dict(tma=True, sorted_x=True, gate_up_dot=True), dict()),  # one [gate | up] dot per k step, twice
        (dict(persistent1=True, persistent=True), dict()),  # the persistent loops, unflattened
        (dict(split_tail=True), dict()),  # single-block tails still run half tiles
        (EVERY_FORM, dict()),
        (dict(expert_groups=True, group_m1=2, group_m2=2), dict()),  # tiles expert by expert
        (dict(), dict(gated=False, activation="relu")),  # one accumulator
        (dict(tma=True), dict(top_k=1, routing="sigmoid_top1_input_scaled")),  # weights on the input (Llama 4)
        # GEMM 1 folds, GEMM 2 runs the folded blocks in their own tiles: full ones (reading the rows nobody wrote,
        # storing none of them), or half tiles through act's half-height boxes
        (dict(fold_gemm2=False), dict()),
        (dict(fold_gemm2=False, split_tail=True, tma=True), dict()),
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_fold_tails(options, model, deterministic, dtype, generator, monkeypatch):
    cfg = KernelConfig(block_m=32, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       fold_tails=True, **options)  # fmt: skip
    counts = FOLD_COUNTS if model.get("top_k", 2) == 2 else FOLD_COUNTS[:-1]  # top-1: any total
    gemm1, gemm2, unwritten = _run_poisoned(monkeypatch, cfg, dtype, generator, deterministic, counts, **model)
    assert [k["FOLD_TAILS"] for k in gemm1] == [True] and [k["FOLD_TAILS"] for k in gemm2] == [cfg.fold_gemm2]
    # act: a folded block's first half written by the tile before it, its second half by nobody (NaN from the
    # poisoned buffer); a split tail's second half neither; every other row written
    launch, blocks = gemm1[0], unwritten.shape[0]
    slots = launch["num_slots"]
    folded = _folded_blocks(launch["sorted_ids_ptr"], launch["expert_ids_ptr"], blocks, slots, 32)
    assert len(folded) == 3  # 45's, 65's and 48's tails
    for block in range(blocks):
        half_empty = int(launch["sorted_ids_ptr"][block * 32 + 16]) >= slots
        split = cfg.split_tail and (not cfg.persistent1 or cfg.persistent_tails) and half_empty
        assert not unwritten[block, :16].any(), block
        assert bool(unwritten[block, 16:].all()) == (block in folded or split), block


# against block_m = 64 (quarters of 16 rows, halves of 32): tails of 1-16 rows swap (5, 16, 70 = 64 + 6, 13), 17-32
# split (17, 32) or run full tiles (33, 100 = 64 + 36), none at 0 and 64
SWAP_COUNTS = [0, 5, 16, 17, 32, 33, 64, 70, 100, 13]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options,model",
    [
        (dict(), dict()),
        (dict(split_tail=True), dict()),  # quarters swap, the other halves split
        (dict(tma=True), dict()),  # weight boxes through TMA
        (dict(tma=True, gate_up_dot=True, split_tail=True), dict()),  # one [gate | up] box per k step
        (dict(persistent1=True, persistent_tails=True, split_tail=True), dict()),  # the persistent loop, unflattened
        (dict(expert_groups=True, group_m1=2, group_m2=2, fold_tails=True), dict()),  # folds first, then swaps
        (dict(), dict(gated=False, activation="relu")),  # one accumulator
        (dict(tma=True), dict(top_k=1, routing="sigmoid_top1_input_scaled")),  # weights on the input (Llama 4)
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_swap_tails1(options, model, deterministic, dtype, generator, monkeypatch):
    cfg = KernelConfig(block_m=64, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       swap_tails1=True, **options)  # fmt: skip
    counts = SWAP_COUNTS if model.get("top_k", 2) == 2 else SWAP_COUNTS[:-1]
    gemm1, _, unwritten = _run_poisoned(monkeypatch, cfg, dtype, generator, deterministic, counts, **model)
    assert [k["SWAP_TAILS"] for k in gemm1] == [True]
    # act: a swapped block's first quarter written, the rest by nobody (NaN from the poisoned buffer); a split
    # block's second half neither; a folded block's second half neither; every other row written
    launch, blocks = gemm1[0], unwritten.shape[0]
    slots, ids = launch["num_slots"], launch["sorted_ids_ptr"]
    folded = _folded_blocks(ids, launch["expert_ids_ptr"], blocks, slots, 64) if cfg.fold_tails else []
    swapped = 0
    for block in range(blocks):
        quarter_empty = int(ids[block * 64 + 16]) >= slots
        half_empty = int(ids[block * 64 + 32]) >= slots
        swap = quarter_empty and block not in folded
        swapped += swap
        assert not unwritten[block, :16].any(), block
        assert bool(unwritten[block, 16:32].all()) == swap, block
        assert bool(unwritten[block, 32:].all()) == (swap or block in folded or (cfg.split_tail and half_empty)), block
    assert swapped == (3 if cfg.fold_tails else 4) - (model.get("top_k", 2) == 1)  # 70's tail folds under fold_tails


def test_swap_tails1_only_where_it_can():
    for other in (dict(block_m=32), dict(tma=True, gluon=True), dict(tma=True, gluon1=True),
                  dict(tma=True, sorted_x=True), dict(one_launch=True), dict(decode=True),
                  dict(grouped_mm=True)):  # fmt: skip
        with pytest.raises(ValueError, match="swap_tails1"):
            KernelConfig(block_m=other.pop("block_m", 64), swap_tails1=True, **other)
    KernelConfig(block_m=64, swap_tails1=True, tma=True, gluon2=True)  # GEMM 1 swaps, the Gluon GEMM 2 runs its tiles


def test_fold_tails_only_with_a_triton_gemm():
    for other in (dict(block_m=16), dict(tma=True, gluon=True), dict(one_launch=True), dict(decode=True),
                  dict(grouped_mm=True)):  # fmt: skip
        with pytest.raises(ValueError, match="fold_tails"):
            KernelConfig(fold_tails=True, **other)
    KernelConfig(fold_tails=True, tma=True, gluon2=True)  # GEMM 1 stays Triton: it folds, the Gluon GEMM 2 does not
    with pytest.raises(ValueError, match="fold_gemm2"):
        KernelConfig(fold_gemm2=False)  # turns off a fold nobody asked for
    assert KernelConfig(fold_tails=True).fold_tails2 and not KernelConfig(fold_tails=True, fold_gemm2=False).fold_tails2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(split_tail=True),
        dict(tma=True, persistent1=True, persistent=True),  # one program per SM: bigger shares
        dict(tma=True, sorted_x=True, gate_up_dot=True, persistent1=True),
    ],
)
@pytest.mark.parametrize("num_tokens", [1, 7, 301])
def test_gemm1_clears_the_combine_output(options, num_tokens, dtype, generator, monkeypatch):
    """gemm1_clears_out: no fill launch, GEMM 1's programs clear the atomic combine's output, a share each, every
    element once (the buffer starts as NaN: a share left out shows). T x H (H = 50) is never a multiple of the
    programs (3 column tiles x the row blocks, or 3 persistent programs in the interpreter); the persistent shares of
    T = 301 span several store blocks, the last one partial."""
    cfg = KernelConfig(block_m=32, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       gemm1_clears_out=True, **options)  # fmt: skip
    _poison(monkeypatch)
    gemm1 = _spy_launches(monkeypatch, "_gemm1_kernel")
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=50, intermediate_size=40, expert_bias=True)
    _run_case(config, num_tokens, dtype, generator, kernel_config=cfg, deterministic=False)
    (launch,) = gemm1
    assert launch["ZERO_OUT"] and launch["zero_numel"] == num_tokens * config.hidden_size
    # the deterministic combine writes every slot row itself: nothing to clear
    _run_case(config, num_tokens, dtype, generator, kernel_config=cfg, deterministic=True)
    assert not gemm1[1]["ZERO_OUT"] and gemm1[1]["zero_ptr"] is None


def test_gemm1_clears_out_only_with_the_tiled_gemms():
    for other in (dict(decode=True), dict(grouped_mm=True), dict(one_launch=True)):
        with pytest.raises(ValueError, match="gemm1_clears_out: only with the two-launch tiled GEMMs"):
            KernelConfig(gemm1_clears_out=True, **other)
    assert KernelConfig(gemm1_clears_out=1).gemm1_clears_out is True


def test_expert_groups_only_with_the_tiled_gemms():
    # the decode kernels and torch's grouped GEMM have no tile order to change: the flag would be silently ignored
    for other in (dict(decode=True), dict(grouped_mm=True)):
        with pytest.raises(ValueError, match="expert_groups: only with the tiled GEMMs"):
            KernelConfig(expert_groups=True, **other)
    assert KernelConfig(expert_groups=1, one_launch=True).expert_groups is True


# expert_groups: the tiles run expert by expert, group_m blocks of one expert at a time; block_m = 16 gives
# SPLIT_COUNTS' experts 0-5 blocks, so group_m 1-3 cuts most experts into several groups and leaves tails of groups
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(group_m1=1, group_m2=2),
        dict(group_m1=3, group_m2=8, persistent=True),
        dict(group_m1=2, group_m2=3, tma=True, persistent1=True, persistent=True),
        dict(group_m1=2, group_m2=2, tma=True, sorted_x=True, gate_up_dot=True, persistent1=True),
        dict(group_m1=3, group_m2=1, block_m=32, split_tail=True, persistent=True, persistent_tails=True),
        dict(group_m1=2, group_m2=3, one_launch=True),
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's only sign of a read past expert_starts
def test_expert_groups(options, deterministic, dtype, generator, monkeypatch):
    fields = dict(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2, num_stages2=2)
    cfg = KernelConfig(**{**fields, **options}, expert_groups=True)
    _poison(monkeypatch)
    gemm1 = _spy_launches(monkeypatch, "_gemm1_kernel")
    gemm2 = _spy_launches(monkeypatch, "_gemm2_kernel")
    _run_split_counts(cfg, dtype, generator, deterministic)
    launches = gemm1 + gemm2
    assert len(launches) == (0 if cfg.one_launch else 2) and all(k["EXPERT_GROUPS"] for k in launches)


@triton.jit
def _tile_order_kernel(out_ptr, expert_ids_ptr, expert_starts_ptr, num_blocks_m, num_blocks_n,
                       GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr, COL_GROUP: tl.constexpr = 0):  # fmt: skip
    tile = tl.program_id(0)
    pid_m, pid_n, expert = _tile_coords(
        tile, num_blocks_m, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS, COL_GROUP
    )
    tl.store(out_ptr + 3 * tile, pid_m)
    tl.store(out_ptr + 3 * tile + 1, pid_n)
    tl.store(out_ptr + 3 * tile + 2, expert)


# experts of 0-6 blocks of 16 rows, some empty, for the tile-order tests
TILE_ORDER_COUNTS = [0, 3, 16, 17, 32, 45, 12, 65, 24, 26, 0, 80]


def _tile_order_align():
    """(the alignment of TILE_ORDER_COUNTS' slots in shuffled order, its blocks in use)."""
    from tilemoe.ops.align import moe_align_torch

    counts = TILE_ORDER_COUNTS
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(sum(counts))]
    align = moe_align_torch(ids.view(-1, 1).to(DEVICE, torch.int32), len(counts), 16)
    return align, int(align.num_padded) // 16


def _tile_order(align, used_m, num_blocks_n, **constexprs):
    """[tiles, 3] (pid_m, pid_n, expert) of each tile of ``_tile_coords`` in its order, on the CPU."""
    coords = torch.full((used_m * num_blocks_n, 3), -1, dtype=torch.int32, device=DEVICE)
    _tile_order_kernel[(used_m * num_blocks_n,)](coords, align.expert_ids, align.expert_starts, used_m, num_blocks_n,
                                                 **constexprs)  # fmt: skip
    return coords.cpu()


@pytest.mark.parametrize("group_m", [1, 2, 3, 8])
def test_expert_groups_order_is_a_bijection_whose_groups_keep_to_one_expert(group_m):
    align, used_m = _tile_order_align()
    counts, num_blocks_n = TILE_ORDER_COUNTS, 5
    coords = _tile_order(align, used_m, num_blocks_n, GROUP_M=group_m, EXPERT_GROUPS=True)
    out = coords[:, :2]
    pairs = [tuple(p) for p in out.tolist()]
    assert sorted(pairs) == [(m, n) for m in range(used_m) for n in range(num_blocks_n)]  # every tile once
    experts = align.expert_ids.cpu()[out[:, 0].long()].tolist()
    assert experts == sorted(experts)  # expert by expert
    assert coords[:, 2].tolist() == experts  # the expert id it returns is its block's
    # a run of group_m blocks over all columns: its tiles belong to one expert
    starts = align.expert_starts.tolist()
    for expert in range(len(counts)):
        blocks = starts[expert + 1] - starts[expert]
        tiles = out[[i for i, e in enumerate(experts) if e == expert]]
        for group_start in range(0, blocks, group_m):
            group_tiles = tiles[group_start * num_blocks_n : (group_start + group_m) * num_blocks_n]
            rows = set(group_tiles[:, 0].tolist())
            assert rows == set(range(starts[expert] + group_start, starts[expert] + min(blocks, group_start + group_m)))


@pytest.mark.parametrize("expert_groups", [False, True])
@pytest.mark.parametrize("col_group, group_m", [(1, 2), (2, 8), (3, 3), (5, 1), (7, 4)])
def test_column_groups_order_is_a_bijection_column_group_by_column_group(col_group, group_m, expert_groups):
    align, used_m = _tile_order_align()
    num_blocks_n = 5
    coords = _tile_order(align, used_m, num_blocks_n, GROUP_M=group_m, EXPERT_GROUPS=expert_groups,
                         COL_GROUP=col_group)  # fmt: skip
    pairs = [tuple(p) for p in coords[:, :2].tolist()]
    assert sorted(pairs) == [(m, n) for m in range(used_m) for n in range(num_blocks_n)]  # every tile once
    assert coords[:, 2].tolist() == align.expert_ids.cpu()[coords[:, 0].long()].tolist()  # each block's expert
    # column group by column group: the tiles of columns [g * col_group, (g + 1) * col_group) come together, g rising,
    # and inside a group the order is the one without groups over the group's columns
    column_groups = (coords[:, 1] // col_group).tolist()
    assert column_groups == sorted(column_groups)
    for group in range(-(-num_blocks_n // col_group)):
        width = min(col_group, num_blocks_n - group * col_group)
        inner = _tile_order(align, used_m, width, GROUP_M=group_m, EXPERT_GROUPS=expert_groups)
        inner[:, 1] += group * col_group
        assert torch.equal(coords[coords[:, 1] // col_group == group], inner)


# GEMM 2 column group by column group (its persistent Triton loop, flattened or with split / folded tails): the same
# sums in another tile order
COL_GROUPS = [
    dict(persistent=True, col_group2=1),
    dict(persistent=True, col_group2=2, expert_groups=True),
    dict(persistent=True, col_group2=3, split_tail=True, block_m=32),
    dict(persistent=True, col_group2=2, fold_tails=True, block_m=32),
    dict(tma=True, persistent=True, col_group2=2),
]


@pytest.mark.parametrize("options", COL_GROUPS)
@pytest.mark.parametrize("num_tokens, hot_expert, deterministic", [(7, None, False), (64, 2, True)])
def test_gemm2_column_groups(options, num_tokens, hot_expert, deterministic, generator, monkeypatch):
    # H = 72: 5 column blocks of 16, the last part-filled, so the last group is narrower than col_group2
    config = MoEConfig(num_experts=5, top_k=3, hidden_size=72, intermediate_size=40, expert_bias=True)
    cfg = KernelConfig(**{**dict(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2,
                                 num_stages2=2), **options})  # fmt: skip
    launches = _spy_launches(monkeypatch, "_gemm2_kernel")
    _run_case(config, num_tokens, torch.float16, generator, hot_expert=hot_expert, kernel_config=cfg,
              deterministic=deterministic)  # fmt: skip
    assert launches or num_tokens == 0
    assert all(kw["COL_GROUP"] == cfg.col_group2 for kw in launches)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(persistent=True, tma=True),
        dict(split_tail=True, block_m=32),
        dict(gluon=True, tma=True, block_m=64),
    ],
    ids=["triton", "persistent-tma", "split-tail", "gluon"],  # gluon: the Triton kernels in the interpreter
)
@pytest.mark.parametrize("num_tokens", [1, 45])  # S = 3: one align program; 135: the scatter programs
def test_align_clears_the_atomic_output(options, num_tokens, generator, monkeypatch):
    config = MoEConfig(num_experts=5, top_k=3, hidden_size=40, intermediate_size=24)
    cfg = KernelConfig(**{**dict(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2,
                                 num_stages2=2, align_clears_out=True), **options})  # fmt: skip
    fills = _spy(monkeypatch, launch_module, "_combine_output")
    aligns = []
    real_align = launch_module.moe_align

    def align_spy(*args, zeros=None, **kwargs):
        if zeros is not None:
            zeros.fill_(float("nan"))  # poisoned: only the align's zeros make the sums right
        aligns.append(zeros)
        return real_align(*args, zeros=zeros, **kwargs)

    monkeypatch.setattr(launch_module, "moe_align", align_spy)
    _run_case(config, num_tokens, torch.float16, generator, kernel_config=cfg, deterministic=False)
    assert fills == [] and len(aligns) == 1 and aligns[0] is not None  # no fill of its own: the align cleared it
    _run_case(config, num_tokens, torch.float16, generator, kernel_config=cfg, deterministic=True)
    assert aligns[1] is None and len(fills) == 1  # the per-slot rows need no zeros


@pytest.mark.parametrize("options", [dict(), dict(persistent=True, tma=True, persistent1=True)])
def test_per_slot_combine_sums_slots_where_atomics_are_allowed(options, generator, monkeypatch):
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=40, intermediate_size=24)
    cfg = KernelConfig(**{**dict(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2,
                                 num_stages2=2, per_slot_combine=True), **options})  # fmt: skip
    outputs = _spy(monkeypatch, launch_module, "_combine_output")
    sums = _spy(monkeypatch, launch_module, "sum_slots")
    _run_case(config, 45, torch.float16, generator, kernel_config=cfg, deterministic=False)
    # GEMM 2 wrote one row a slot ([T*K, H], no zeros to add into), then the K rows of each token were summed
    assert [tuple(o.shape) for o in outputs] == [(90, 40)] and len(sums) == 1
    with pytest.raises(ValueError, match="per_slot_combine"):
        KernelConfig(block_m=16, per_slot_combine=True, decode=True)


def test_align_clears_out_or_gemm1_does():
    with pytest.raises(ValueError, match="align_clears_out"):
        KernelConfig(align_clears_out=True, gemm1_clears_out=True)
    with pytest.raises(ValueError, match="align_clears_out"):
        KernelConfig(block_m=16, align_clears_out=True, decode=True)
    assert KernelConfig(align_clears_out=1).align_clears_out is True


def test_col_group2_needs_a_gemm2_loop_that_walks_tiles():
    with pytest.raises(ValueError, match="col_group2"):
        KernelConfig(col_group2=2)  # the one-program-per-tile Triton GEMM 2
    with pytest.raises(ValueError, match="col_group2"):
        KernelConfig(persistent=True, col_group2=-1)
    with pytest.raises(ValueError, match="col_group2"):
        KernelConfig(persistent=True, col_group2=True)
    assert KernelConfig(persistent=True, col_group2=2).col_group2 == 2
    assert KernelConfig(tma=True, gluon2=True, col_group2=4).col_group2 == 4


def test_split_tail_needs_block_m_32():
    with pytest.raises(ValueError, match="split_tail"):
        KernelConfig(block_m=16, split_tail=True)
    assert KernelConfig(block_m=32, split_tail=1).split_tail is True


def test_persistent_tails_needs_split_tail_and_a_persistent_gemm():
    for bad in (dict(persistent=True), dict(split_tail=True), dict(split_tail=True, one_launch=True)):
        with pytest.raises(ValueError, match="persistent_tails: needs split_tail and persistent or persistent1"):
            KernelConfig(block_m=32, persistent_tails=True, **bad)
    assert KernelConfig(block_m=32, split_tail=True, persistent1=True, persistent_tails=1).persistent_tails is True


# GEMM 1's dense forms: x in padded order through TMA boxes (sorted_x), one dot over a [2, BN, BK] gate/up box
# (gate_up_dot), a persistent flattened tile loop (persistent1; 3 programs in the interpreter), and all together
GEMM1_FORMS = [
    dict(tma=True, sorted_x=True),
    dict(tma=True, gate_up_dot=True),
    dict(persistent1=True),
    dict(tma=True, persistent1=True),
    dict(tma=True, sorted_x=True, gate_up_dot=True, persistent1=True),
    dict(tma=True, sorted_x=True, gate_up_dot=True, persistent1=True, persistent=True),
]


ALL_DENSE = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages1=2, num_stages2=2,
                         tma=True, sorted_x=True, gate_up_dot=True, persistent1=True)  # fmt: skip


@pytest.mark.parametrize(
    "num_experts, top_k, num_tokens, hot_expert, changes",
    [
        (10, 8, 300, None, {}),  # K = 8, more rows than the 3 programs' first tiles
        (9, 1, 64, None, dict(routing="topk_softmax")),  # K = 1, E not a power of two
        (5, 2, 7, 3, {}),  # one expert takes every token, the others none
        (6, 1, 40, None, dict(routing="sigmoid_top1_input_scaled", activation="gelu")),  # weights on the input
        (6, 2, 33, None, dict(activation="swigluoai", expert_bias=True)),  # gpt-oss's clamps and biases
    ],
)
def test_gemm1_dense_forms_edges(num_experts, top_k, num_tokens, hot_expert, changes, generator):
    config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=40, intermediate_size=24).replace(**changes)
    _run_case(config, num_tokens, torch.float16, generator, hot_expert=hot_expert, kernel_config=ALL_DENSE)


@pytest.mark.parametrize(
    "num_experts, top_k, num_tokens, hot_expert, hidden",
    [(10, 8, 300, None, 40), (5, 2, 7, 3, 600), (9, 1, 64, None, 24)],  # H over one 512-column block: two
)
def test_sorted_copy_token_by_token(num_experts, top_k, num_tokens, hot_expert, hidden, generator, monkeypatch):
    # x's padded sorted copy read token by token (each x row once, stored to its K rows; padding rows zeroed by
    # programs of their own) equals the row-by-row copy on every row in use, from poisoned buffers; then the layer
    from tilemoe.ops.align import align_capacity, moe_align

    _poison(monkeypatch)
    x = torch.randn(num_tokens, hidden, generator=generator).to(DEVICE, torch.float16)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    if hot_expert is not None:
        ids[:, 0] = hot_expert
        ids[:, 1:] = (hot_expert + 1 + torch.arange(top_k - 1)) % num_experts
    align = moe_align(ids.to(DEVICE, torch.int32), num_experts, 16)
    capacity = align_capacity(num_tokens * top_k, num_experts, 16)
    by_row = launch_module._sorted_rows(x, align, capacity, top_k)
    monkeypatch.setattr(launch_module, "SORTED_ROWS_BY_TOKEN_MIN_BYTES", 0)
    by_token = launch_module._sorted_rows(x, align, capacity, top_k)
    used = int(align.num_padded)
    padding = align.sorted_ids[:used] >= num_tokens * top_k
    assert bool(padding.any()) and bool((by_row[:used][padding] == 0).all())
    assert torch.equal(by_token[:used], by_row[:used])
    if num_tokens < 100:  # the layer through it (sorted_x), where the interpreter is quick
        config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=40, intermediate_size=24)
        _run_case(config, num_tokens, torch.float16, generator, hot_expert=hot_expert, kernel_config=ALL_DENSE)


def _form_id(options: dict) -> str:
    return "+".join(name for name, on in options.items() if on)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", GEMM1_FORMS, ids=_form_id)
@pytest.mark.parametrize(
    "hidden, inter, gated",
    [
        (48, 40, True),  # H, I not multiples of the 16 tiles: zero-filled boxes past H and past I in the gate/up box
        (64, 32, True),  # multiples: the unmasked loop
        (40, 24, False),  # plain MLP: gate_up_dot does not apply (one dot already)
    ],
)
def test_gemm1_dense_forms(options, hidden, inter, gated, dtype, generator, monkeypatch):
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=hidden, intermediate_size=inter, gated=gated,
                       expert_bias=True)  # fmt: skip
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2,
                       num_stages2=2, **options)  # fmt: skip
    _poison(monkeypatch)
    gate_up = _spy(monkeypatch, launch_module, "_gate_up_descriptor")
    sorted_rows = _spy(monkeypatch, launch_module, "_sorted_rows")
    _run_case(config, 45, dtype, generator, kernel_config=cfg)
    # the forms asked for really ran: the 3-D gate/up descriptor (gated only) and the sorted copy of x
    assert [d is not None for d in gate_up] == ([True] if cfg.gate_up_dot and gated else [])
    assert len(sorted_rows) == int(cfg.sorted_x)


@pytest.mark.parametrize("num_tokens", [0, 1, 2])
@pytest.mark.parametrize("options", GEMM1_FORMS[-2:], ids=_form_id)
def test_gemm1_dense_forms_tiny_batches(num_tokens, options, generator):
    # fewer rows than one block, and more programs than tiles in the persistent loop
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=32, intermediate_size=16)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, **options)
    _run_case(config, num_tokens, torch.float32, generator, kernel_config=cfg)


@pytest.mark.parametrize(
    "options",
    [
        dict(tma=True, sorted_x=True),  # GEMM 1's half tiles read x_sorted through their own [16, 16] boxes
        dict(tma=True, sorted_x=True, gate_up_dot=True),
        dict(tma=True, sorted_x=True, gate_up_dot=True, persistent1=True),  # full tiles only: split tails off
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_split_tail_gemm1_dense_forms(options, deterministic, generator, monkeypatch):
    cfg = KernelConfig(block_m=32, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       split_tail=True, **options)  # fmt: skip
    _poison(monkeypatch)
    built = _spy(monkeypatch, launch_module, "_tma_descriptor")
    _run_split_counts(cfg, torch.float16, generator, deterministic)
    # x_sorted's boxes (the descriptors over H columns that are not w13's): [32, 16] for full tiles, then [16, 16]
    # for the half tiles unless GEMM 1 is persistent
    w13_rows = len(SPLIT_COUNTS) * 2 * 40
    x_boxes = [d.block_shape for d in built if d is not None and d.shape[1] == 48 and d.shape[0] != w13_rows]
    assert x_boxes == ([[32, 16]] if cfg.persistent1 else [[32, 16], [16, 16]])


def test_sorted_rows_is_the_padded_gather(generator):
    from tilemoe.ops.align import moe_align

    num_tokens, top_k, num_experts, hidden = 37, 3, 6, 40
    x = torch.randn(num_tokens, hidden, generator=generator).to(DEVICE, torch.float16)
    topk_ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator).to(DEVICE, torch.int32)
    align = moe_align(topk_ids, num_experts, 16)
    capacity = align.sorted_ids.numel()
    x_sorted = launch_module._sorted_rows(x, align, capacity, top_k)
    used = int(align.num_padded)
    slot = align.sorted_ids[:used].long()
    valid = slot < num_tokens * top_k
    expected = torch.where(valid[:, None], x[torch.where(valid, slot // top_k, 0)], torch.zeros_like(x[:1]))
    assert torch.equal(x_sorted[:used], expected)


def test_gemm1_dense_forms_need_tma():
    for name in ("sorted_x", "gate_up_dot"):
        with pytest.raises(ValueError, match=f"KernelConfig.{name}: needs tma=True"):
            KernelConfig(**{name: True})
    assert KernelConfig(persistent1=True).persistent1 is True  # the loop needs no TMA


# ---------------------------------------------------------------------------------------- routing inside GEMM 1
ROUTED_CASES = [
    dict(),  # softmax top-k, renormalised
    dict(num_experts=10, top_k=8),  # K = 8 of 10: the top-k loop runs deep, E not a power of two
    dict(renormalize=False, routed_scaling_factor=2.5),
    dict(routing="topk_softmax", activation="swigluoai", expert_bias=True),
    dict(routing="sigmoid_top1_input_scaled", top_k=1, activation="gelu", gated=False),  # weights on the input
    # the softmax's sum over 64 lanes, 35 used: a float32 tl.sum came out a last bit apart on the GPU (the decode
    # GEMM 1's warps against the routing kernel's one); 160 experts: the routing kernel's 4 warps. Layouts exist on
    # the GPU only (the interpreter reduces both kernels alike): test_route's order test guards the sums on the CPU
    dict(num_experts=35, top_k=5),
    dict(num_experts=160, top_k=8, routing="topk_softmax"),
]


@pytest.mark.parametrize("changes", ROUTED_CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 3, 9])
def test_from_logits_routes_inside_the_decode_gemm1(changes, num_tokens, generator, monkeypatch):
    """The decode GEMM 1 routes its slot's token (no routing launch): ids and weights exactly the routing kernel's,
    the output exactly the routing-first path's and close to the float64 reference."""
    import tilemoe.ops.route as route_module
    from tilemoe.ops.route import route_triton

    config = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=24).replace(**changes)
    w = make_weights(config, dtype=torch.float16, device=DEVICE, generator=generator)
    x = make_input(num_tokens, config, dtype=torch.float16, device=DEVICE, generator=generator)
    logits = torch.randn(num_tokens, config.num_experts, generator=generator).to(DEVICE)
    logits[:, 1] = logits[:, 4]  # a tie: the lower expert wins, in both kernels
    _poison(monkeypatch)
    monkeypatch.setattr(fused_experts_module, "DECODE_ROUTE_MAX_TOKENS", 64)  # the kernel at every T, not just T=1
    routed = _spy(monkeypatch, route_module, "route_fast")
    out, weights, ids = fused_experts_module.fused_experts_from_logits(
        x, w["w13"], w["w2"], logits, config=config, b13=w["b13"], b2=w["b2"], kernel_config=DECODE
    )
    assert routed == [] and fused_experts_module.decode_route_error is None  # no routing launch, no fallback
    ref_weights, ref_ids = route_triton(logits, config)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    two_step = fused_experts(x, w["w13"], w["w2"], ref_weights, ref_ids, config=config, b13=w["b13"], b2=w["b2"],
                             kernel_config=DECODE)  # fmt: skip
    assert torch.equal(out, two_step)
    assert_close(out, reference_experts(x, w, ref_weights, ref_ids, config), torch.float16)


@pytest.mark.parametrize(
    "changes, kernel_config, num_tokens",
    [
        (dict(), SMALL, 1),  # the tiled path: the routing kernel first
        (dict(routing="softmax_grouped_topk", n_group=2, topk_group=1, top_k=2, num_experts=8), DECODE, 1),  # grouped
        (dict(), DECODE, 2),  # more tokens than DECODE_ROUTE_MAX_TOKENS (measured slower inside from T=4 on)
        (dict(num_experts=9), DECODE, 1),  # more experts than the flat routing kernel takes (patched to 8 below)
    ],
)
def test_from_logits_routes_first_elsewhere(changes, kernel_config, num_tokens, generator, monkeypatch):
    import tilemoe.ops.route as route_module

    monkeypatch.setattr(route_module, "FLAT_ROUTE_MAX_EXPERTS", 8)

    config = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=24).replace(**changes)
    w = make_weights(config, dtype=torch.float32, device=DEVICE, generator=generator)
    x = make_input(num_tokens, config, dtype=torch.float32, device=DEVICE, generator=generator)
    logits = torch.randn(num_tokens, config.num_experts, generator=generator).to(DEVICE)
    routed = _spy(monkeypatch, route_module, "route_fast")
    out, weights, ids = fused_experts_module.fused_experts_from_logits(
        x, w["w13"], w["w2"], logits, config=config, kernel_config=kernel_config
    )
    assert len(routed) == 1 and torch.equal(ids, routed[0][1]) and torch.equal(weights, routed[0][0])
    assert_close(out, reference_experts(x, w, weights, ids, config), torch.float32)


@pytest.mark.parametrize("kernel_config", [DECODE, SMALL], ids=["routed_in_gemm1", "routing_kernel_first"])
def test_from_logits_non_finite_logits_stay_in_their_row(kernel_config, generator, monkeypatch):
    """A token whose router logits hold NaN gets a NaN output row and valid ids; the other tokens' rows are what
    they are without it (before the routing kernel ranked NaN, its id was E: a read past the expert weights)."""
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=24)
    w = make_weights(config, dtype=torch.float32, device=DEVICE, generator=generator)
    x = make_input(5, config, dtype=torch.float32, device=DEVICE, generator=generator)
    logits = torch.randn(5, config.num_experts, generator=generator)
    logits[2, 4] = float("nan")
    logits[3] = float("nan")
    monkeypatch.setattr(fused_experts_module, "DECODE_ROUTE_MAX_TOKENS", 64)  # the decode GEMM 1 routes at T = 5
    call = fused_experts_module.fused_experts_from_logits
    out, weights, ids = call(x, w["w13"], w["w2"], logits.to(DEVICE), config=config, kernel_config=kernel_config)
    assert int(ids.min()) >= 0 and int(ids.max()) < config.num_experts
    assert all(len(set(row)) == config.top_k for row in ids.tolist())
    assert out[2:4].isnan().all()
    clean = [0, 1, 4]
    assert torch.isfinite(out[clean]).all()
    _, ref_weights, ref_ids = call(x[clean], w["w13"], w["w2"], logits[clean].to(DEVICE), config=config,
                                   kernel_config=kernel_config)  # fmt: skip
    assert torch.equal(ids[clean], ref_ids) and torch.equal(weights[clean], ref_weights)
    assert_close(out[clean], reference_experts(x[clean], w, ref_weights, ref_ids, config), torch.float32)


def test_from_logits_bad_arguments(generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=16)
    w = make_weights(config, device=DEVICE, generator=generator)
    x = make_input(4, config, device=DEVICE, generator=generator)
    call = fused_experts_module.fused_experts_from_logits
    with pytest.raises(ValueError, match=r"router_logits: expected shape \[4, 6\], got \[4, 5\]"):
        call(x, w["w13"], w["w2"], torch.zeros(4, 5, device=DEVICE), config=config)
    with pytest.raises(TypeError, match="router_logits: expected a float tensor"):
        call(x, w["w13"], w["w2"], torch.zeros(4, 6, dtype=torch.int32, device=DEVICE), config=config)
    with pytest.raises(ValueError, match=r"w2: expected 6 experts \(config.num_experts\), got 5"):
        call(x, w["w13"][:5], w["w2"][:5], torch.zeros(4, 6, device=DEVICE), config=config)
    with pytest.raises(ValueError, match="w13: expected shape"):
        call(x, w["w13"][:, :8], w["w2"], torch.zeros(4, 6, device=DEVICE), config=config)


# ------------------------------------------------------------------------------------ both GEMMs in one launch
ONE_LAUNCH_FORMS = [
    dict(),
    dict(tma=True),  # weights through TMA, act by pointers
    dict(tma=True, sorted_x=True, gate_up_dot=True),
    dict(expert_groups=True, group_m1=2, group_m2=3),  # the ready words under the expert-by-expert order
]


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("options", ONE_LAUNCH_FORMS, ids=lambda o: _form_id(o) or "plain")
@pytest.mark.parametrize(
    "hidden, inter, gated",
    [
        (48, 40, True),  # H, I not multiples of the tiles
        (40, 24, False),  # plain MLP
    ],
)
def test_one_launch(options, hidden, inter, gated, deterministic, generator, monkeypatch):
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=hidden, intermediate_size=inter, gated=gated,
                       expert_bias=True)  # fmt: skip
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2,
                       num_stages2=2, one_launch=True, **options)  # fmt: skip
    _poison(monkeypatch)
    launched = _spy(monkeypatch, launch_module, "_launch_one")
    _run_case(config, 45, torch.float16, generator, kernel_config=cfg, deterministic=deterministic)
    ((_, ready),) = launched
    assert int(ready[-1]) == 0  # no GEMM 2 tile found its rows missing
    used = int(ready[:-1].sum())
    assert used > 0 and used % -(-inter // 16) == 0  # every GEMM 1 tile of the used blocks marked its rows ready


@pytest.mark.skipif(
    DEVICE == "cuda",
    reason="the interpreter's sequential programs make the order certain; "
    "on a GPU the programs run side by side and the check passes",
)
def test_one_launch_ready_check_fails_out_of_order(generator, monkeypatch):
    # 3 programs in the interpreter run one after the other: program 0's GEMM 2 tiles come before programs 1 and 2
    # ran their GEMM 1 tiles, so the ready check must fail (the error word is set, the output is wrong). Fixed loads
    # make that certain: 4 blocks of 16 rows x 3 GEMM 1 column tiles; tile t is (block t % 4, column t // 4), so
    # program 0 (tiles 0, 3, 6, ...) never runs all three tiles of a block, and its tiles 12, 15, 18 are GEMM 2's.
    from tilemoe.bench.scenarios import _ids_from_counts

    monkeypatch.setattr(launch_module, "ONE_LAUNCH_INTERPRETER_PROGRAMS", 3)
    launched = _spy(monkeypatch, launch_module, "_launch_one")
    config = MoEConfig(num_experts=4, top_k=1, hidden_size=32, intermediate_size=48)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, one_launch=True)
    w = make_weights(config, device=DEVICE, generator=generator)
    x = make_input(64, config, device=DEVICE, generator=generator)
    topk_ids = _ids_from_counts([16, 16, 16, 16], 64, 1, generator).to(DEVICE, torch.int32)
    topk_weights = torch.ones(64, 1, device=DEVICE)
    fused_experts(x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, kernel_config=cfg)
    ((_, ready),) = launched
    assert int(ready[-1]) == 1


@pytest.mark.parametrize(
    "num_experts, top_k, num_tokens, hot_expert",
    [
        (10, 8, 300, None),  # K = 8, many blocks
        (5, 2, 7, 3),  # one expert takes every token
        (6, 2, 0, None),
        (6, 2, 1, None),
    ],
)
def test_one_launch_edges(num_experts, top_k, num_tokens, hot_expert, generator):
    config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=40, intermediate_size=24)
    cfg = KernelConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, one_launch=True)
    _run_case(config, num_tokens, torch.float32, generator, hot_expert=hot_expert, kernel_config=cfg)


@pytest.mark.parametrize("deterministic", [True, False])
def test_one_launch_split_tail(deterministic, generator, monkeypatch):
    cfg = KernelConfig(block_m=32, block_n1=16, block_k1=16, block_n2=32, block_k2=16, num_stages1=2, num_stages2=2,
                       split_tail=True, tma=True, sorted_x=True, one_launch=True)  # fmt: skip
    _poison(monkeypatch)
    _run_split_counts(cfg, torch.float16, generator, deterministic)


def test_one_launch_config_rules():
    with pytest.raises(ValueError, match="one_launch: needs num_warps1 == num_warps2"):
        KernelConfig(one_launch=True, num_warps1=8, num_warps2=4)
    with pytest.raises(ValueError, match="one_launch: not with persistent"):
        KernelConfig(one_launch=True, tma=True, persistent=True)
    with pytest.raises(ValueError, match="one_launch: not with persistent"):
        KernelConfig(one_launch=True, persistent1=True)


def test_from_logits_falls_back_when_the_routing_gemm1_does_not_build(generator, monkeypatch):
    """A Triton that cannot build the routing decode GEMM 1: one warning, then the routing kernel first, same
    results (ids exactly the routing kernel's)."""
    from tilemoe.ops.route import route_triton

    real = fused_experts_module._launch_decode

    def no_routing_build(*args, route=None, **kwargs):
        if route is not None:  # what a backend pass failure raises
            raise RuntimeError("PassManager::run failed (simulated: this Triton cannot build it)")
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_experts_module, "_launch_decode", no_routing_build)
    monkeypatch.setattr(fused_experts_module, "decode_route_error", None)
    monkeypatch.setattr(fused_experts_module, "DECODE_ROUTE_MAX_TOKENS", 4)
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=24)
    w = make_weights(config, dtype=torch.float16, device=DEVICE, generator=generator)
    x = make_input(4, config, dtype=torch.float16, device=DEVICE, generator=generator)
    logits = torch.randn(4, config.num_experts, generator=generator).to(DEVICE)
    call = fused_experts_module.fused_experts_from_logits
    with pytest.warns(RuntimeWarning, match="did not build here"):
        out, weights, ids = call(x, w["w13"], w["w2"], logits, config=config, kernel_config=DECODE)
    assert fused_experts_module.decode_route_error is not None
    ref_weights, ref_ids = route_triton(logits, config)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    assert_close(out, reference_experts(x, w, ref_weights, ref_ids, config), torch.float16)
    out2, _, _ = call(x, w["w13"], w["w2"], logits, config=config, kernel_config=DECODE)  # no second warning
    assert torch.equal(out2, out)


# ---------------------------------------------------------------------------------------- shared memory fitting
class _SharedMemoryLimitedKernel:
    """A Triton kernel as a GPU with little shared memory sees it: num_stages above ``fits`` refused as Triton does
    (OutOfResources, before anything runs), every launch's stages recorded; the others launch ``real`` when given."""

    def __init__(self, fits: int, real=None, stage_arg: str = "num_stages"):
        self.fits, self.real, self.launched, self.refused, self.stage_arg = fits, real, [], [], stage_arg

    def __getitem__(self, grid):
        def launch(**kwargs):
            from triton.runtime.errors import OutOfResources

            stages = kwargs[self.stage_arg]
            if stages > self.fits:
                self.refused.append(stages)
                raise OutOfResources(49152 * stages, 101376, "shared memory")
            self.launched.append(stages)
            if self.real is not None:
                self.real[grid](**kwargs)

        return launch


def test_launch_fitting_lowers_the_stages_until_the_kernel_fits(monkeypatch):
    from tilemoe.ops import _launch

    monkeypatch.setattr(_launch, "_FITTED_STAGES", {})
    device = torch.device("cuda", 0)  # only named: nothing runs on it
    kernel = _SharedMemoryLimitedKernel(fits=2)
    assert _launch.launch_fitting(kernel, (4,), device, BLOCK_M=128, num_warps=8, num_stages=4, x=torch.zeros(2)) == 2
    assert kernel.refused == [4, 3] and kernel.launched == [2]
    # remembered: the next launch with the same constants goes straight to 2 stages; other constants try their own
    _launch.launch_fitting(kernel, (4,), device, BLOCK_M=128, num_warps=8, num_stages=4, x=torch.zeros(3))
    assert kernel.refused == [4, 3] and kernel.launched == [2, 2]
    _launch.launch_fitting(kernel, (4,), device, BLOCK_M=64, num_warps=8, num_stages=3, x=torch.zeros(3))
    assert kernel.refused == [4, 3, 3] and kernel.launched == [2, 2, 2]


def test_launch_fitting_names_the_kernel_when_nothing_fits(monkeypatch):
    from tilemoe.ops import _launch

    monkeypatch.setattr(_launch, "_FITTED_STAGES", {})
    kernel = _SharedMemoryLimitedKernel(fits=0)
    with pytest.raises(
        RuntimeError, match=r"even at 1 stage \(BLOCK_M=256, BLOCK_N=256, .*kernel_config with smaller tiles"
    ):
        _launch.launch_fitting(kernel, (1,), torch.device("cuda", 0), BLOCK_M=256, BLOCK_N=256, num_stages=3)
    assert kernel.refused == [3, 2, 1]


def test_launch_fitting_lowers_a_gluon_ring_no_further_than_its_minimum(monkeypatch):
    # a Gluon kernel's ring depth is its own keyword (NUM_STAGES), and a ring needs two stages: one would never fill
    from tilemoe.ops import _launch

    monkeypatch.setattr(_launch, "_FITTED_STAGES", {})
    kernel = _SharedMemoryLimitedKernel(fits=3, stage_arg="NUM_STAGES")
    stages = _launch.launch_fitting(kernel, (1,), torch.device("cuda", 0), stage_arg="NUM_STAGES", min_stages=2,
                                    NUM_STAGES=5, num_warps=8)  # fmt: skip
    assert stages == 3 and kernel.refused == [5, 4] and kernel.launched == [3]
    kernel = _SharedMemoryLimitedKernel(fits=1, stage_arg="NUM_STAGES")
    with pytest.raises(RuntimeError, match=r"even at 2 stages \("):
        _launch.launch_fitting(kernel, (1,), torch.device("cuda", 0), stage_arg="NUM_STAGES", min_stages=2,
                               NUM_STAGES=3, num_warps=8)  # fmt: skip
    assert kernel.refused == [3, 2] and kernel.launched == []


@pytest.mark.parametrize("error", ["ValueError", "threads"])
def test_launch_fitting_lets_other_errors_through(error, monkeypatch):
    from triton.runtime.errors import OutOfResources

    from tilemoe.ops import _launch

    class Broken:
        def __init__(self):
            self.tries = 0

        def __getitem__(self, grid):
            def launch(**kwargs):
                self.tries += 1
                if error == "threads":  # fewer stages would not help
                    raise OutOfResources(2048, 1024, "threads")
                raise ValueError("not a resource problem")

            return launch

    kernel = Broken()
    with pytest.raises(OutOfResources if error == "threads" else ValueError):
        _launch.launch_fitting(kernel, (1,), torch.device("cuda", 0), num_stages=3)
    assert kernel.tries == 1


def test_fused_experts_fits_its_gemms_to_the_shared_memory(monkeypatch, generator):
    """Both GEMMs launched through launch_fitting: refused at 3 stages (as on a 99 KiB GPU), run at 2, right."""
    import tilemoe.ops._kernels._fused_experts as kernels
    from tilemoe.ops import _launch

    monkeypatch.setattr(_launch, "_FITTED_STAGES", {})
    limited = {
        name: _SharedMemoryLimitedKernel(2, getattr(kernels, name)) for name in ("_gemm1_kernel", "_gemm2_kernel")
    }
    for name, kernel in limited.items():
        monkeypatch.setattr(kernels, name, kernel)
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=64, intermediate_size=48)
    cfg = KernelConfig(block_m=16, block_n1=32, block_k1=32, num_stages1=3, block_n2=32, block_k2=32, num_stages2=3)
    with _launch.recording_stages() as stages:  # what the tuner reads to write the config as it ran
        _run_case(config, 20, torch.float32, generator, kernel_config=cfg)
    refused = [(name, stages) for name, kernel in limited.items() for stages in kernel.refused]
    assert refused == [("_gemm1_kernel", 3), ("_gemm2_kernel", 3)]
    assert stages == {"num_stages1": 2, "num_stages2": 2}
    _run_case(config, 20, torch.float32, generator, kernel_config=cfg)  # outside the block: not recorded
    assert stages == {"num_stages1": 2, "num_stages2": 2} and not _launch._STAGE_RECORDS
