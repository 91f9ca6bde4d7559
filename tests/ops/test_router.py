"""router_logits_triton against the float64 router GEMM: fresh random inputs, poisoned outputs, per-dtype
tolerances (the kernel sums float32 products in its own order).

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); it has no tl.dot, so bf16 is tested here too.
"""

import pytest
import torch

import tilemoe.ops.router as router_module
from tilemoe.ops.router import (
    ROUTER_KERNEL_MAX_TOKENS,
    ROUTER_PARTS_MAX_TOKENS,
    router_logit_parts,
    router_logits_fast,
    router_logits_triton,
    router_parts_layout,
    uses_router_kernel,
    uses_router_parts,
)
from tilemoe.routing import router_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 products summed over H <= 4200 in another order; inputs of these dtypes are exact in float32
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    def poisoned(num_tokens, num_experts, device):
        return torch.full((num_tokens, num_experts), float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(router_module, "_empty_logits", poisoned)
    empty_parts = router_module._empty_parts

    def poisoned_parts(x, weight):
        return empty_parts(x, weight).fill_(float("nan"))

    monkeypatch.setattr(router_module, "_empty_parts", poisoned_parts)


def _inputs(t, e, h, dtype, generator, bias=False):
    x = torch.randn(t, h, generator=generator).to(DEVICE, dtype)
    w = (torch.randn(e, h, generator=generator) * h**-0.5).to(DEVICE, dtype)
    b = torch.randn(e, generator=generator).to(DEVICE, dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    return router_logits(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("t", "e", "h"), [(0, 8, 64), (1, 128, 2048), (7, 13, 200), (32, 64, 72), (5, 3, 16), (2, 5, 4200)]
)
def test_router_logits_against_float64(t, e, h, dtype):
    gen = torch.Generator().manual_seed(t * 1000 + e * 10 + h)
    x, w, b = _inputs(t, e, h, dtype, gen, bias=t % 2 == 1)
    out = router_logits_triton(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (t, e)
    torch.testing.assert_close(out.double(), _reference(x, w, b), atol=ATOL, rtol=1e-5)


def test_router_logits_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=gen).to(DEVICE).t()  # [6, 64], stride (1, 6)
    w = torch.randn(64, 20, generator=gen).to(DEVICE).t()  # [20, 64], non-contiguous
    out = router_logits_triton(x, w)
    torch.testing.assert_close(out.double(), _reference(x, w, None), atol=ATOL, rtol=1e-5)


def test_router_logits_fast_picks_the_kernel_only_for_few_tokens_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(router_module, "router_logits_triton", lambda *a: calls.append(a) or router_logits(*a))
    gen = torch.Generator().manual_seed(5)
    for t in (1, ROUTER_KERNEL_MAX_TOKENS, ROUTER_KERNEL_MAX_TOKENS + 1):
        x, w, _ = _inputs(t, 8, 32, torch.float16, gen)
        out = router_logits_fast(x, w)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), _reference(x, w, None), atol=1e-3, rtol=1e-3)
    assert [a[0].shape[0] for a in calls] == ([1, ROUTER_KERNEL_MAX_TOKENS] if DEVICE == "cuda" else [])


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "b_shape", "dtype", "match"),
    [
        ((4, 16), (8, 32), None, torch.float32, "weight: expected shape \\[E, 16\\]"),
        ((4,), (8, 16), None, torch.float32, "x: expected a 2-D tensor"),
        ((4, 16), (8, 16), (7,), torch.float32, "bias: expected shape \\[8\\]"),
        ((4, 16), (8, 16), None, torch.float64, "x: expected dtype"),
    ],
)
def test_router_logits_bad_input(x_shape, w_shape, b_shape, dtype, match):
    x = torch.zeros(x_shape, dtype=dtype, device=DEVICE)
    w = torch.zeros(w_shape, dtype=torch.float32, device=DEVICE)
    b = None if b_shape is None else torch.zeros(b_shape, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        router_logits_triton(x, w, b)


def test_uses_router_kernel_only_for_few_16_or_32_bit_tokens_on_cuda():
    assert not uses_router_kernel(torch.zeros(1, 16))  # the CPU (interpreter or not): the reference's GEMM
    if DEVICE == "cuda":
        assert uses_router_kernel(torch.zeros(ROUTER_KERNEL_MAX_TOKENS, 16, device="cuda", dtype=torch.bfloat16))
        assert not uses_router_kernel(torch.zeros(ROUTER_KERNEL_MAX_TOKENS + 1, 16, device="cuda"))
        assert not uses_router_kernel(torch.zeros(1, 16, device="cuda", dtype=torch.float64))


# The parts' tensor-core dot: float16 in the interpreter (its dot is wrong for bfloat16), bfloat16 too on a GPU
PARTS_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", PARTS_DTYPES)
@pytest.mark.parametrize(
    ("t", "e", "h"), [(0, 8, 64), (1, 8, 64), (7, 60, 200), (64, 128, 512), (300, 160, 384), (33, 3, 1000)]
)
def test_router_logit_parts_sum_to_the_float64_logits(t, e, h, dtype):
    """Every part written (poisoned), their sum the router GEMM: E not a power of two, over 128 (two expert blocks),
    H not a multiple of the 128-column step, a bias (added once, in part 0)."""
    gen = torch.Generator().manual_seed(t * 1000 + e * 10 + h)
    x, w, b = _inputs(t, e, h, dtype, gen, bias=t % 2 == 1)
    parts = router_logit_parts(x, w, b)
    _, _, num_parts, _ = router_parts_layout(t, e, h, router_module._sm_count(x.device))
    assert parts.dtype == torch.float32 and parts.shape == (num_parts, t, e)
    torch.testing.assert_close(parts.double().sum(0), _reference(x, w, b), atol=ATOL * 4, rtol=1e-5)


def test_router_logit_parts_strided_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 40, generator=gen).to(DEVICE, torch.float16).t()  # [40, 200], stride (1, 40)
    w = torch.randn(300, 24, generator=gen).to(DEVICE, torch.float16).t()[:, :200]  # [24, 200], non-contiguous
    parts = router_logit_parts(x, w)
    torch.testing.assert_close(parts.double().sum(0), _reference(x, w, None), atol=ATOL * 4, rtol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "experts", "hidden", "sms"),
    [(9, 8, 4096, 132), (64, 8, 4096, 132), (1024, 64, 2048, 132), (4096, 128, 2048, 132), (16384, 128, 2880, 132),
     (512, 256, 7168, 132), (300, 160, 384, 78), (100, 8, 100, 132), (40, 4, 0, 132)],
)  # fmt: skip
def test_router_parts_layout(tokens, experts, hidden, sms):
    block_t, block_e, parts, h_per_part = router_parts_layout(tokens, experts, hidden, sms)
    assert block_t in (16, 32, 64) and block_e in (16, 32, 64, 128) and block_e >= min(experts, 128)
    max_parts = max(1, min(8, 2048 // (4 * experts)))  # a token's parts: at most 2 KiB for the routing to load
    assert 1 <= parts <= max_parts and h_per_part % 128 == 0
    assert parts * h_per_part >= hidden and (parts - 1) * h_per_part < max(hidden, 1)  # all of H, no empty part
    blocks, steps = -(-tokens // block_t) * -(-experts // block_e), -(-max(hidden, 1) // 128)
    # split until an SM each, the cap, or H's steps
    assert blocks * parts >= sms or 2 * parts > max_parts or 2 * parts > steps
    assert router_parts_layout(tokens, experts, hidden, sms) == (block_t, block_e, parts, h_per_part)  # pure


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "match"),
    [(torch.float32, torch.float32, "both float16 or both bfloat16"), (torch.float16, torch.bfloat16, "got x")],
)
def test_router_logit_parts_wants_one_16_bit_dtype(x_dtype, w_dtype, match):
    x, w = torch.zeros(4, 16, dtype=x_dtype, device=DEVICE), torch.zeros(8, 16, dtype=w_dtype, device=DEVICE)
    with pytest.raises(TypeError, match=match):
        router_logit_parts(x, w)
    with pytest.raises(ValueError, match="weight: expected shape"):
        router_logit_parts(x, torch.zeros(8, 15, dtype=x_dtype, device=DEVICE))


def test_uses_router_parts_only_for_16_bit_prefill_batches_on_cuda():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert not uses_router_parts(torch.zeros(64, 16, dtype=torch.bfloat16), w)  # the CPU
    if DEVICE == "cuda":
        w = w.cuda()
        assert uses_router_parts(torch.zeros(ROUTER_KERNEL_MAX_TOKENS + 1, 16, device="cuda", dtype=w.dtype), w)
        assert uses_router_parts(torch.zeros(ROUTER_PARTS_MAX_TOKENS, 16, device="cuda", dtype=w.dtype), w)
        assert not uses_router_parts(torch.zeros(ROUTER_KERNEL_MAX_TOKENS, 16, device="cuda", dtype=w.dtype), w)
        assert not uses_router_parts(torch.zeros(ROUTER_PARTS_MAX_TOKENS + 1, 16, device="cuda", dtype=w.dtype), w)
        assert not uses_router_parts(torch.zeros(64, 16, device="cuda", dtype=torch.float16), w)
        assert not uses_router_parts(torch.zeros(64, 16, device="cuda"), w.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("t", "e", "h"), [(9, 128, 2048), (2048, 64, 2048), (300, 7, 100)])
def test_router_logits_fast_16_bit_gemm_with_float32_output_gpu(t, e, h, dtype):
    """Above ROUTER_KERNEL_MAX_TOKENS, 16-bit x and weight: cuBLAS's 16-bit GEMM with float32 output, the float64
    router GEMM to float32 sums' rounding (not the 16-bit output's)."""
    gen = torch.Generator().manual_seed(t + e + h)
    x, w, b = _inputs(t, e, h, dtype, gen, bias=True)
    out = router_logits_fast(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (t, e)
    torch.testing.assert_close(out.double(), _reference(x, w, b), atol=ATOL * 4, rtol=1e-5)
