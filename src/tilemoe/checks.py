"""Input checks shared by the functional API, the module and the expert-parallel layer.

Each error names the argument, what was expected and what came.
"""

from __future__ import annotations

import torch

from tilemoe.config import MoEConfig

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: tuple[int | None, ...],
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> None:
    """Raise TypeError/ValueError unless ``t`` has ``shape`` (None = any size), a dtype in ``dtypes``,
    lives on ``device`` and, when asked, is contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where x is), got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def check_expert_weights(
    config: MoEConfig,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    *,
    num_local_experts: int | None = None,
) -> None:
    e = config.num_experts if num_local_experts is None else num_local_experts
    h, i = config.hidden_size, config.intermediate_size
    check_tensor("w13", w13, (e, config.w13_rows, h), dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("w2", w2, (e, h, i), dtypes=FLOAT_DTYPES, device=x.device)
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"w13/w2: expected dtype {x.dtype} (the dtype of x), got w13 {w13.dtype}, w2 {w2.dtype}")
    if b13 is not None:
        check_tensor("b13", b13, (e, config.w13_rows), dtypes=FLOAT_DTYPES, device=x.device)
    if b2 is not None:
        check_tensor("b2", b2, (e, h), dtypes=FLOAT_DTYPES, device=x.device)


def check_shared_weights(
    config: MoEConfig,
    x: torch.Tensor,
    shared_w13: torch.Tensor | None,
    shared_w2: torch.Tensor | None,
    shared_gate: torch.Tensor | None,
) -> None:
    """Shared expert weights: none at all, or shared_w13 [2Is, H] ([Is, H] plain), shared_w2 [H, Is] and,
    exactly when config.shared_expert_gate, shared_gate [1, H]; dtype and device of x."""
    if shared_w13 is None and shared_w2 is None and shared_gate is None:
        return
    if not config.has_shared_experts:
        raise ValueError(
            "shared_w13: the config has no shared experts (num_shared_experts=0), got shared expert weights"
        )
    if shared_w13 is None or shared_w2 is None:
        missing = "shared_w13" if shared_w13 is None else "shared_w2"
        raise ValueError(f"{missing}: expected a tensor when the other shared expert weights are given, got None")
    h, si = config.hidden_size, config.shared_intermediate_size
    rows = 2 * si if config.gated else si
    check_tensor("shared_w13", shared_w13, (rows, h), dtypes=(x.dtype,), device=x.device)
    check_tensor("shared_w2", shared_w2, (h, si), dtypes=(x.dtype,), device=x.device)
    if config.shared_expert_gate and shared_gate is None:
        raise ValueError(f"shared_gate: expected a [1, {h}] tensor (config.shared_expert_gate is True), got None")
    if shared_gate is not None:
        if not config.shared_expert_gate:
            raise ValueError("shared_gate: config.shared_expert_gate is False, got a gate tensor")
        check_tensor("shared_gate", shared_gate, (1, h), dtypes=(x.dtype,), device=x.device)


def check_topk(
    config: MoEConfig,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    check_ids_range: bool = True,
) -> None:
    """Shapes and dtypes of the routing result; ids in [0, E) unless ``check_ids_range`` is False
    (the range check reads the ids back to the host: skipped while a CUDA graph is captured)."""
    t, k = x.shape[0], config.top_k
    check_tensor("topk_ids", topk_ids, (t, k), device=x.device)
    check_tensor("topk_weights", topk_weights, (t, k), device=x.device)
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids: expected dtype int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights: expected a floating dtype, got {topk_weights.dtype}")
    if check_ids_range and topk_ids.numel() and not _capturing():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= config.num_experts:
            raise ValueError(f"topk_ids: expected every id in [0, {config.num_experts}), got ids in [{lo}, {hi}]")


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
