"""moe_forward: route -> experts (dispatch, MLP, combine inside the chosen implementation) -> shared experts."""

from __future__ import annotations

import torch

from tilemoe.checks import FLOAT_DTYPES, check_expert_weights, check_shared_weights, check_tensor, check_topk
from tilemoe.config import MoEConfig
from tilemoe.impls import resolve_impl
from tilemoe.ops.activation import act_and_mul_torch
from tilemoe.ops.route import route_fast

__all__ = ["moe_forward", "shared_experts_forward", "experts_forward"]


def shared_experts_forward(
    x: torch.Tensor,
    shared_w13: torch.Tensor,
    shared_w2: torch.Tensor,
    config: MoEConfig,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense shared-expert MLP on every token: x [T, H] -> [T, H] (gate [1, H] scales by sigmoid(x @ g))."""
    h = x @ shared_w13.t()
    y = act_and_mul_torch(h, config) @ shared_w2.t()
    if shared_gate is not None:
        y = torch.sigmoid(x @ shared_gate.t()) * y
    return y


def experts_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig,
    impl: str = "auto",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts only (no router, no shared experts) through a registered implementation.

    x [T, H]; returns [T, H] in x.dtype. Inputs are assumed checked (see ``moe_forward``).
    """
    implementation = resolve_impl(impl, x.device)
    if x.shape[0] == 0:
        return x.new_empty((0, x.shape[1]))
    return implementation.fn(x, w13, w2, topk_weights.float(), topk_ids.to(torch.int32), config=config, b13=b13, b2=b2)


def moe_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    router_logits: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    config: MoEConfig,
    impl: str = "auto",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """One MoE layer, functional.

    Args:
        x: [T, H] or [B, S, H], fp32 / fp16 / bf16 (fp64 for the reference).
        w13: [E, 2I, H] gate rows then up rows ([E, I, H] for a plain MLP); w2: [E, H, I]; same dtype as x.
        router_logits: [T, E]; routed with ``config.routing``. Or give both ``topk_weights`` [T, K]
            (float) and ``topk_ids`` [T, K] (int32/int64) instead.
        impl: a name from ``tilemoe.available_impls()``, or "auto" (fastest available on x's device).
        b13, b2: optional expert biases [E, 2I] / [E, H].
        correction_bias: [E] expert-choice bias of grouped sigmoid routing (DeepSeek-V3).
        shared_w13, shared_w2, shared_gate: shared expert weights [2Is, H], [H, Is], optional gate [1, H].
        check_ids: check given ``topk_ids`` are in [0, E) (a host read; skipped under graph capture).
    Returns:
        [T, H] or [B, S, H] like x, in x.dtype.
    Raises:
        ValueError / TypeError naming the argument on a wrong shape, dtype or device, top_k > E or ids
        out of range.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
    check_tensor("x", x, (None,) * x.dim() if isinstance(x, torch.Tensor) else (None,), dtypes=FLOAT_DTYPES)
    if x.dim() not in (2, 3) or x.shape[-1] != config.hidden_size:
        raise ValueError(
            f"x: expected shape [T, {config.hidden_size}] or [B, S, {config.hidden_size}], got {list(x.shape)}"
        )
    leading = x.shape[:-1]
    x2 = x.reshape(-1, config.hidden_size)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    check_expert_weights(config, x2, w13, w2, b13, b2)
    check_shared_weights(config, x2, shared_w13, shared_w2, shared_gate)

    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise ValueError("router_logits: give either router_logits or topk_weights+topk_ids, not both")
        check_tensor("router_logits", router_logits, (x2.shape[0], config.num_experts), device=x2.device)
        implementation = resolve_impl(impl, x2.device)
        if implementation.from_logits is not None and x2.shape[0] > 0:  # routes inside its kernels
            out = implementation.from_logits(
                x2, w13, w2, router_logits, config=config, correction_bias=correction_bias, b13=b13, b2=b2
            )
        else:
            # on CUDA the routing kernel (same ids as `route`); elsewhere plain torch
            topk_weights, topk_ids = route_fast(router_logits, config, correction_bias=correction_bias)
            out = experts_forward(x2, w13, w2, topk_weights, topk_ids, config=config, impl=impl, b13=b13, b2=b2)
    elif topk_ids is None or topk_weights is None:
        raise ValueError("router_logits: expected router_logits, or both topk_weights and topk_ids; got neither")
    else:
        check_topk(config, x2, topk_weights, topk_ids, check_ids_range=check_ids)
        out = experts_forward(x2, w13, w2, topk_weights, topk_ids, config=config, impl=impl, b13=b13, b2=b2)
    if shared_w13 is not None:
        out = out + shared_experts_forward(x2, shared_w13, shared_w2, config, shared_gate)
    return out.reshape(*leading, config.hidden_size)
