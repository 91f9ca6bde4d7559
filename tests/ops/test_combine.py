"""sum_slots: against the float64 sum, bitwise against the fixed-order float32 sum, determinism, errors."""

import pytest
import torch

from tilemoe.ops import combine as combine_module
from tilemoe.ops.combine import sum_slots, sum_slots_torch
from tilemoe.testing import POISON, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _per_slot(num_tokens, top_k, hidden, dtype, generator):
    return torch.randn(num_tokens * top_k, hidden, generator=generator).to(DEVICE, dtype)


def _fixed_order_sum(per_slot, top_k):
    """The documented arithmetic: float32 accumulation over k = 0..K-1, one rounding at the end."""
    rows = per_slot.float().reshape(-1, top_k, per_slot.shape[1])
    acc = rows[:, 0].clone()
    for k in range(1, top_k):
        acc += rows[:, k]
    return acc.to(per_slot.dtype)


def _assert_near_exact_sum(out, per_slot, top_k):
    """Within one rounding to out.dtype plus float32 accumulation error of the float64 sum."""
    rows = per_slot.double().cpu().reshape(-1, top_k, per_slot.shape[1])
    ref = rows.sum(1)
    bound = torch.finfo(out.dtype).eps * ref.abs() + top_k * 2.0**-23 * rows.abs().sum(1) + 1e-30
    err = (out.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3e}, max (err / bound) {float((err / bound).max())}"
    assert_close(out, ref, dtype=out.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "top_k", "hidden"),
    [
        (7, 8, 100),  # H not a multiple of the tile or of a 16-byte vector; several tokens per program
        (33, 2, 1040),  # H over one tile (512 floats / 1024 halves): a partial last column block
        (3, 6, 16),  # the smallest tile, K not a power of two
        (1, 4, 2048),  # T = 1 (decode), qwen3 hidden size
    ],
)
def test_sum_slots_matches_float64(num_tokens, top_k, hidden, dtype, generator):
    per_slot = _per_slot(num_tokens, top_k, hidden, dtype, generator)
    out = torch.full((num_tokens, hidden), POISON, dtype=dtype, device=DEVICE)
    combine_module._sum_slots_into(per_slot, top_k, out)  # poisoned output: an unwritten element fails
    _assert_near_exact_sum(out, per_slot, top_k)
    if dtype != torch.bfloat16 or DEVICE == "cuda":  # the interpreter truncates float32 -> bf16 (GPU: to nearest)
        assert torch.equal(out, _fixed_order_sum(per_slot, top_k))  # bitwise: same order, same roundings
    again = sum_slots(per_slot, top_k)
    assert torch.equal(again, out)  # deterministic
    assert_close(sum_slots_torch(per_slot, top_k), out.double(), dtype=dtype)


def test_sum_slots_strided_input(generator):
    # rows of a wider buffer (stride(0) = 96 != H) and a column-strided view
    base = torch.randn(5 * 3, 96, generator=generator).to(DEVICE, torch.float16)
    for per_slot in (base[:, :80], base[:, ::2]):
        out = sum_slots(per_slot, 3)
        _assert_near_exact_sum(out, per_slot, 3)
        assert torch.equal(out, _fixed_order_sum(per_slot, 3))


def test_sum_slots_edges(generator):
    per_slot = _per_slot(4, 1, 24, torch.float16, generator)
    assert sum_slots(per_slot, 1) is per_slot  # K = 1: the input itself, no copy
    empty = sum_slots(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), 8)
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16
    assert sum_slots_torch(torch.empty(0, 64, device=DEVICE), 8).shape == (0, 64)


def test_sum_slots_torch_fallback_matches_kernel(monkeypatch, generator):
    # the CPU path without Triton does the kernel's arithmetic, so it never mutates a float32 input
    per_slot = _per_slot(6, 4, 40, torch.float32, generator)
    keep = per_slot.clone()
    kernel = sum_slots(per_slot, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = sum_slots(per_slot.cpu(), 4)
    assert torch.equal(out, kernel.cpu()) and torch.equal(per_slot, keep)


def test_sum_slots_custom_op(generator):
    per_slot = _per_slot(5, 4, 48, torch.float16, generator)
    torch.library.opcheck(torch.ops.tilemoe.sum_slots.default, (per_slot, 4))
    compiled = torch.compile(lambda x: sum_slots(x, 4), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(per_slot), sum_slots(per_slot, 4))


def test_sum_slots_bad_arguments():
    x = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="per_slot"):
        sum_slots(torch.zeros(8, 2, 16), 2)
    with pytest.raises(ValueError, match="per_slot"):
        sum_slots([[1.0]], 1)
    with pytest.raises(TypeError, match="per_slot"):
        sum_slots(x.double(), 2)
    with pytest.raises(TypeError, match="per_slot"):
        sum_slots(x.int(), 2)
    for top_k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            sum_slots(x, top_k)
    with pytest.raises(ValueError, match="multiple of top_k=3"):
        sum_slots(x, 3)
    with pytest.raises(ValueError, match="top_k"):
        sum_slots_torch(x, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_slots_large_gpu(dtype, generator):
    # a prefill of a model with H = 7168 (deepseek-v3 / kimi-k2): 7 column tiles of 1024 halves (14 of 512 floats)
    per_slot = _per_slot(2048, 8, 7168, dtype, generator)
    out = sum_slots(per_slot, 8)
    assert torch.equal(out, _fixed_order_sum(per_slot, 8))
    assert torch.equal(out, sum_slots(per_slot, 8))
    assert_close(out, per_slot.double().view(2048, 8, 7168).sum(1), dtype=dtype)


@pytest.mark.gpu
def test_sum_slots_int64_offsets_gpu(generator):
    # S * H = 2**31 + 2**19 elements (4 GiB in bf16): the last tokens' rows lie past int32 offsets
    num_tokens, top_k, hidden = 262_208, 4, 2048
    per_slot = torch.empty(num_tokens * top_k, hidden, dtype=torch.bfloat16, device="cuda")
    per_slot.normal_()
    out = sum_slots(per_slot, top_k)
    tail = slice(num_tokens - 64, num_tokens)
    assert torch.equal(out[tail], _fixed_order_sum(per_slot[tail.start * top_k :], top_k))


@pytest.mark.gpu
def test_sum_slots_cuda_graph_and_compile_gpu(generator):
    per_slot = _per_slot(512, 8, 2048, torch.bfloat16, generator)
    expected = sum_slots(per_slot, 8)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = sum_slots(per_slot, 8)
    fresh = _per_slot(512, 8, 2048, torch.bfloat16, generator)
    per_slot.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, _fixed_order_sum(fresh, 8))
    compiled = torch.compile(lambda x: sum_slots(x, 8), fullgraph=True)
    assert torch.equal(compiled(fresh), _fixed_order_sum(fresh, 8))
    assert not torch.equal(expected, got)


def sum_slots_timings(shapes=((1024, 8, 2048), (4096, 8, 2048), (16384, 8, 2048), (4096, 8, 7168))):
    """Median microseconds (CUDA-graph replays) of sum_slots and of the torch reduce + cast, bf16, per (T, K, H).

    Run ``pytest tests/ops/test_combine.py -m gpu -k timings -s`` on the GPU.
    """
    from tilemoe.bench.timing import measure

    generator = torch.Generator().manual_seed(0)
    rows = []
    for num_tokens, top_k, hidden in shapes:
        per_slot = _per_slot(num_tokens, top_k, hidden, torch.bfloat16, generator)
        row = {"T": num_tokens, "K": top_k, "H": hidden}
        for name, fn in (("sum_slots", sum_slots), ("torch", sum_slots_torch)):
            call = lambda x, fn=fn, k=top_k: fn(x, k)
            stats = measure(call, [per_slot], warmup=10, iters=50, device="cuda", cuda_graph=True)
            row[name] = round(stats.p50 * 1000, 1)
        moved = per_slot.numel() * 2 * (1 + 1 / top_k)  # bytes read + written by one pass
        row["sum_slots_TB/s"] = round(moved / (row["sum_slots"] * 1e-6) / 1e12, 2)
        rows.append(row)
    return rows


@pytest.mark.gpu
def test_sum_slots_timings_gpu():
    for row in sum_slots_timings():
        print("sum_slots us (p50, graph replays):", row)
