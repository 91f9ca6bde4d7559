"""Test helpers: per-dtype tolerances, assert_close with a useful message, input and routing factories."""

from __future__ import annotations

import importlib

import torch

from tilemoe.config import MoEConfig

# (atol, rtol) per output dtype, for a layer output compared with the float64 reference. atol is for outputs of RMS
# up to 1 (make_weights' scale); assert_close scales it with a larger reference RMS: a near-zero element is a sum of
# terms as large as the others, rounded (the activated intermediate in the output dtype) as they are. The GPU fuzz
# (session 29) drew layers with routed_scaling_factor 2.5, output RMS ~3: torch's own bf16 layer (``naive``) had
# 932 of 131516 elements past a fixed atol of 2e-2, the kernels 343.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-3),
    torch.float16: (4e-3, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
# Relative Frobenius error ||out - ref|| / ||ref|| accepted per dtype (METHOD.md: tf32 ~3e-4, bf16 1e-3..1e-2).
REL_ERROR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-3,  # Triton's fp32 dot runs in tf32
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
POISON = float("nan")
# the modules whose ``torch.empty`` allocates the fused-experts launchers' buffers
LAUNCHER_MODULES = ("tilemoe.ops._fused_experts_launch", "tilemoe.ops.fused_experts")


class PoisonedTorch:
    """``torch`` with ``empty`` filling float tensors with POISON, set as a launcher module's ``torch``: a buffer row
    the kernels should have written, or should never read, shows in the output."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        return out.fill_(POISON) if out.is_floating_point() else out


def poison_launchers(set_attribute=setattr) -> None:
    """Every buffer the fused-experts launchers allocate from now on starts as POISON. In a test pass
    ``monkeypatch.setattr``, which undoes it after the test."""
    for name in LAUNCHER_MODULES:
        set_attribute(importlib.import_module(name), "torch", PoisonedTorch())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.detach().to(torch.float64).cpu()
    diff = out.detach().to(torch.float64).cpu() - ref64
    return float(diff.norm() / ref64.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, name: str = "out"):
    """Fail unless ``out`` matches ``ref`` within the tolerances of ``dtype`` (default out.dtype).

    NaN anywhere in ``out`` fails (outputs are poisoned with NaN before a run, so an unwritten element
    shows up here). Per element: |out - ref| <= atol * max(1, RMS of ref) + rtol * |ref| (``TOLERANCES``), for all
    but a 1e-3 share; and the relative RMS error within ``REL_ERROR``. The message gives shapes, max abs error and
    where, and the relative RMS error.
    """
    dtype = dtype or out.dtype
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}")
    if out.numel() == 0:
        return
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    bad_nan = ~torch.isfinite(o) & torch.isfinite(r)
    if bad_nan.any():
        where = bad_nan.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad_nan.sum())} non-finite elements (unwritten or overflow), first at {where}"
        )
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, float(r[torch.isfinite(r)].pow(2).mean().sqrt().nan_to_num(0.0)))
    rel = relative_error(o, r)
    err = (o - r).abs()
    excess = err - (atol + rtol * r.abs())
    if rel > REL_ERROR[dtype] or (excess > 0).float().mean() > 1e-3:
        flat = int(err.argmax())
        idx = list(torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: mismatch for {dtype}: max abs err {float(err.max()):.3e} at {[int(i) for i in idx]} "
            f"(out {float(o.flatten()[flat]):.5g}, ref {float(r.flatten()[flat]):.5g}), "
            f"relative error {rel:.3e} (limit {REL_ERROR[dtype]:.1e}), "
            f"{int((excess > 0).sum())}/{err.numel()} elements beyond atol={atol:.3g}, rtol={rtol}"
        )


def make_weights(
    config: MoEConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    num_experts: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Random expert weights (and biases when config.expert_bias) scaled so activations stay O(1)."""
    e = config.num_experts if num_experts is None else num_experts
    h, i = config.hidden_size, config.intermediate_size

    def rnd(*shape, scale):
        if generator is None:  # drawn where they live: real-size weights (GBs) skip a host round trip
            return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
        return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(device, dtype)

    out = {
        "w13": rnd(e, config.w13_rows, h, scale=h**-0.5),
        "w2": rnd(e, h, i, scale=i**-0.5),
        "b13": None,
        "b2": None,
    }
    if config.expert_bias:
        out["b13"] = rnd(e, config.w13_rows, scale=0.1)
        out["b2"] = rnd(e, h, scale=0.1)
    return out


def make_routing(
    num_tokens: int,
    config: MoEConfig,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    hot_expert: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct top-k ids per token and positive weights summing to 1.

    ``hot_expert``: every token routes to this expert in slot 0 (one expert takes every token).
    """
    e, k = config.num_experts, config.top_k
    scores = torch.rand(num_tokens, e, generator=generator)
    if hot_expert is not None:
        scores[:, hot_expert] = 2.0
    ids = torch.sort(scores, dim=-1, descending=True, stable=True)[1][:, :k]
    weights = torch.rand(num_tokens, k, generator=generator) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(device), ids.to(device=device, dtype=torch.int32)


def make_input(
    num_tokens: int,
    config: MoEConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return torch.randn(num_tokens, config.hidden_size, generator=generator).to(device, dtype)


def reference_experts(
    x: torch.Tensor, weights: dict, topk_weights: torch.Tensor, topk_ids: torch.Tensor, config: MoEConfig
) -> torch.Tensor:
    """The routed experts in float64 (the "reference" implementation) for ``make_weights``' dict: the oracle of
    every fast path's tests."""
    from tilemoe.impls import get_impl

    w = {k: None if v is None else v.double() for k, v in weights.items()}
    return get_impl("reference").fn(
        x.double(), w["w13"], w["w2"], topk_weights.double(), topk_ids, config=config, b13=w["b13"], b2=w["b2"]
    )


def assert_replays_follow_new_inputs(graph, out, x, weights, topk_weights, topk_ids, config, generator, replays):
    """New inputs and routing copied in place (CUDA) before each replay of ``graph``; its output ``out``, poisoned
    first, must match ``reference_experts`` every time (bf16 tolerances)."""
    for _ in range(replays):
        x.copy_(make_input(x.shape[0], config, dtype=x.dtype, device="cuda", generator=generator))
        new_weights, new_ids = make_routing(x.shape[0], config, device="cuda", generator=generator)
        topk_weights.copy_(new_weights)
        topk_ids.copy_(new_ids)
        out.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference_experts(x, weights, topk_weights, topk_ids, config), torch.bfloat16)
