"""router_logits_triton against the float64 router GEMM: fresh random inputs, poisoned outputs, per-dtype
tolerances (the kernel sums float32 products in its own order).

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); it has no tl.dot, so bf16 is tested here too.
"""

import pytest
import torch

import tilemoe.ops.router as router_module
from tilemoe.ops.router import ROUTER_KERNEL_MAX_TOKENS, router_logits_fast, router_logits_triton, uses_router_kernel
from tilemoe.routing import router_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 products summed over H <= 4200 in another order; inputs of these dtypes are exact in float32
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    def poisoned(num_tokens, num_experts, device):
        return torch.full((num_tokens, num_experts), float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(router_module, "_empty_logits", poisoned)


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
