"""fused_experts: the routed expert MLP of one MoE layer in Triton, no host sync.

    align (sorted_ids, expert_ids; ``tilemoe.ops.align``)
    GEMM 1: gather x rows by slot, x @ w13[e]^T (gate and up column blocks), + b13, act(gate) * up -> act
    GEMM 2: act @ w2[e]^T, + b2, * routing weight -> added atomically into the token's row (the combine fused), or
            per-slot rows (deterministic mode)
    combine (deterministic mode): sum over the K slots of each token, in order (``tilemoe.ops.combine.sum_slots``)

Other forms, chosen by the ``KernelConfig``: the decode kernels (no alignment, T*K small), torch's grouped GEMM for
both GEMMs, and both GEMMs in one persistent launch (``one_launch``). ``fused_experts_from_logits`` takes router
logits instead of the routing: on the decode path its GEMM 1 routes too (one launch less).
``fused_experts_torch`` is the plain-PyTorch reference beside it. The launcher is a ``torch.library``
custom op (``tilemoe::fused_experts``) so torch.compile traces it as one opaque call and CUDA graphs
capture it (nothing reads the device from the host). This file checks the arguments and picks the config; the
launches themselves are in ``tilemoe.ops._fused_experts_launch``.
"""

from __future__ import annotations

import warnings

import torch

from tilemoe.config import MoEConfig
from tilemoe.ops._fused_experts_launch import _device_of, _launch, _launch_decode
from tilemoe.ops.act_and_mul import ACTIVATION_CODES
from tilemoe.ops.activation import act_and_mul_torch
from tilemoe.tuning import KernelConfig, MoEShape, pick_config

__all__ = ["fused_experts", "fused_experts_from_logits", "fused_experts_torch"]

_CONFIG_FIELDS = tuple(KernelConfig.__dataclass_fields__)


@torch.library.custom_op("tilemoe::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: int,
    gated: bool,
    weights_on_input: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    kernel_config: list[int],
    deterministic: bool,
) -> torch.Tensor:
    cfg = KernelConfig(**dict(zip(_CONFIG_FIELDS, kernel_config, strict=True)))
    return _launch(
        x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input,
        swiglu_alpha, swiglu_limit, cfg, deterministic,
    )  # fmt: skip


@_fused_experts_op.register_fake
def _(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input, swiglu_alpha,
      swiglu_limit, kernel_config, deterministic):  # fmt: skip
    return x.new_empty(x.shape)


def _kernel_config_for(x: torch.Tensor, w2: torch.Tensor, top_k: int, kernel_config) -> KernelConfig:
    """``kernel_config``, or ``pick_config``'s for this shape when None; TypeError for anything else."""
    if kernel_config is None:
        num_experts, hidden, inter = w2.shape
        return pick_config(MoEShape(x.shape[0], num_experts, top_k, hidden, inter), x.dtype, _device_of(x))
    if not isinstance(kernel_config, KernelConfig):
        raise TypeError(f"kernel_config: expected a KernelConfig or None, got {type(kernel_config).__name__}")
    return kernel_config


def _expert_args(config: MoEConfig) -> tuple:
    """The custom ops' description of the experts: (activation code, gated, weights on input, alpha, limit)."""
    return (ACTIVATION_CODES[config.activation], config.gated, config.weights_on_input, float(config.swiglu_alpha),
            float(config.swiglu_limit))  # fmt: skip


def _config_ints(kernel_config: KernelConfig) -> list[int]:
    return [int(getattr(kernel_config, name)) for name in _CONFIG_FIELDS]


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    kernel_config: KernelConfig | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Routed experts of one layer: [T, H] -> [T, H] in x.dtype (see ``tilemoe.impls._registry``).

    Args:
        x [T, H] fp32/fp16/bf16; w13 [E, 2I, H] (gate rows, then up rows; [E, I, H] plain); w2 [E, H, I];
        topk_weights [T, K] float32; topk_ids [T, K] int32 in [0, E); b13 [E, 2I] / b2 [E, H] or None.
        kernel_config: tile shapes; ``tilemoe.tuning.pick_config`` when None.
        deterministic: True: GEMM 2 stores each slot's row and a second kernel sums a token's K rows in order
            (bitwise repeatable); False: GEMM 2 adds the rows into the token rows with atomics in x.dtype (the
            combine fused, no [T*K, H] round trip; the order of the additions varies from run to run); None (the
            default): ``torch.are_deterministic_algorithms_enabled()``. The decode path is deterministic either way,
            and so is a kernel config with ``per_slot_combine`` (where the per-slot rows and their sum run faster).
    Raises:
        ValueError / TypeError naming the argument on a shape, dtype or device mismatch.
    """
    _check(x, w13, w2, topk_weights, topk_ids, config, b13, b2)
    kernel_config = _kernel_config_for(x, w2, topk_ids.shape[1], kernel_config)
    return _fused_experts_op(
        x, w13, w2, topk_weights, topk_ids, b13, b2, *_expert_args(config), _config_ints(kernel_config),
        _deterministic(deterministic),
    )  # fmt: skip


def _deterministic(deterministic: bool | None) -> bool:
    """The combine asked for: ``deterministic``, or torch's global switch when None (read when the call is traced or
    captured; torch.use_deterministic_algorithms(True) makes every later call repeatable bit for bit)."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected True, False or None, got {deterministic!r}")
    return deterministic


# Flat routings the decode GEMM 1 runs itself (``tilemoe.ops._kernels._route._flat_topk``'s score codes, as in
# ``tilemoe.ops.route``); grouped routings route in their own kernel first.
DECODE_ROUTE_CODES = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_top1_input_scaled": 2}
# Up to how many tokens the decode GEMM 1 routes them itself. Measured on the H100 (bench/decode_probe.py --routing,
# graph replays in turn, us per layer without the router GEMM; routing kernel then fused_experts vs routing inside):
# T=1 qwen3 37.3 vs 37.2, deepseek 47.4 vs 46.8, gpt-oss 85.3 vs 85.0; T=2 qwen3 61.8 vs 61.8; T=4 qwen3 105.1 vs
# 107.9; T=8 qwen3 181.2 vs 184.1, deepseek 219.1 vs 221.9, gpt-oss 523.1 vs 523.7. The launch it saves is not on the
# critical path (the weights cannot be fetched before the routing either way), and at T >= 4 the per-slot routing in
# every column block costs more than it saves.
DECODE_ROUTE_MAX_TOKENS = 1
# Why the routing GEMM 1 of the decode path failed to build in this process, if it did: the layer then routes in the
# routing kernel first (the same ids and weights; one launch more), after one warning. It built and ran on the H100
# with Triton 3.6; a Triton that cannot build it should cost a launch, not the layer.
decode_route_error: str | None = None


@torch.library.custom_op("tilemoe::fused_experts_routed", mutates_args=())
def _fused_experts_routed_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: int,
    gated: bool,
    weights_on_input: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    top_k: int,
    score: int,
    renormalize: bool,
    scale: float,
    kernel_config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = KernelConfig(**dict(zip(_CONFIG_FIELDS, kernel_config, strict=True)))
    num_tokens = x.shape[0]
    topk_weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=x.device)
    topk_ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=x.device)
    if num_tokens == 0:
        return x.new_empty(x.shape), topk_weights, topk_ids
    experts = (b13, b2, activation, gated, weights_on_input, swiglu_alpha, swiglu_limit, cfg)
    global decode_route_error
    if decode_route_error is None:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        try:
            route = (router_logits, score, renormalize, scale)
            return _launch_decode(x, w13, w2, topk_weights, topk_ids, *experts, route=route), topk_weights, topk_ids
        except (CompilationError, OutOfResources, RuntimeError) as error:  # failed to build, before anything ran
            decode_route_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            warnings.warn(
                f"tilemoe: the decode GEMM 1 that routes its own slots did not build here ({decode_route_error}); "
                "routing in the routing kernel first from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    from tilemoe.ops.route import _route_op

    topk_weights, topk_ids = _route_op(router_logits, top_k, score, renormalize, scale)
    return _launch_decode(x, w13, w2, topk_weights, topk_ids, *experts), topk_weights, topk_ids


@_fused_experts_routed_op.register_fake
def _(x, w13, w2, router_logits, b13, b2, activation, gated, weights_on_input, swiglu_alpha, swiglu_limit, top_k,
      score, renormalize, scale, kernel_config):  # fmt: skip
    shape = (x.shape[0], top_k)
    return x.new_empty(x.shape), x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def fused_experts_from_logits(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    config: MoEConfig,
    correction_bias: torch.Tensor | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    kernel_config: KernelConfig | None = None,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing and routed experts of one layer: (out [T, H] in x.dtype, topk_weights [T, K] float32, topk_ids [T, K]
    int32), the routing exactly ``tilemoe.ops.route.route_fast``'s (on a CPU, where the interpreted decode GEMM 1
    routes (``decode_gemm1_routes``), ``route_triton``'s: route_fast is torch's routing there, a last bit apart).

    Where the config is the decode path (``KernelConfig.decode``, from ``pick_config`` when None), T is at most
    ``DECODE_ROUTE_MAX_TOKENS`` and the routing is flat (``DECODE_ROUTE_CODES``), the decode GEMM 1 routes each slot's
    token itself: one launch less than the routing kernel then ``fused_experts``, which is what runs otherwise.
    Arguments as ``fused_experts``, with router_logits [T, E] (any float dtype) and correction_bias [E] (grouped
    routings) instead of the routing.
    Raises:
        ValueError / TypeError naming the argument on a shape, dtype or device mismatch.
    """
    from tilemoe.ops.route import route_fast

    _check(x, w13, w2, None, None, config, b13, b2)
    if not isinstance(router_logits, torch.Tensor) or not router_logits.is_floating_point():
        raise TypeError(f"router_logits: expected a float tensor, got {getattr(router_logits, 'dtype', router_logits)}")
    if tuple(router_logits.shape) != (x.shape[0], config.num_experts):
        raise ValueError(
            f"router_logits: expected shape [{x.shape[0]}, {config.num_experts}], got {list(router_logits.shape)}"
        )
    if router_logits.device != x.device:
        raise ValueError(f"router_logits: expected device {x.device}, got {router_logits.device}")
    if w2.shape[0] != config.num_experts:  # the routing picks among config.num_experts
        raise ValueError(f"w2: expected {config.num_experts} experts (config.num_experts), got {w2.shape[0]}")
    kernel_config = _kernel_config_for(x, w2, config.top_k, kernel_config)
    if not decode_gemm1_routes(kernel_config, x.shape[0], config, router_logits.dtype):
        topk_weights, topk_ids = route_fast(router_logits, config, correction_bias=correction_bias)
        out = fused_experts(
            x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2, kernel_config=kernel_config,
            deterministic=deterministic,
        )  # fmt: skip
        return out, topk_weights, topk_ids
    return _fused_experts_routed_op(
        x, w13, w2, router_logits, b13, b2, *_expert_args(config), config.top_k, DECODE_ROUTE_CODES[config.routing],
        config.renormalize, float(config.routed_scaling_factor), _config_ints(kernel_config),
    )  # fmt: skip


def decode_gemm1_routes(kernel_config: KernelConfig, num_tokens: int, config: MoEConfig, logits_dtype) -> bool:
    """Whether ``fused_experts_from_logits`` leaves the routing to the decode GEMM 1 (the routing kernel's arithmetic
    inside it): a decode config, at most ``DECODE_ROUTE_MAX_TOKENS`` tokens, a flat routing the kernel takes
    (``FLAT_ROUTE_MAX_EXPERTS``), logits not float64."""
    from tilemoe.ops.route import FLAT_ROUTE_MAX_EXPERTS

    return (
        kernel_config.decode
        and num_tokens <= DECODE_ROUTE_MAX_TOKENS
        and config.routing in DECODE_ROUTE_CODES
        and config.num_experts <= FLAT_ROUTE_MAX_EXPERTS
        and logits_dtype != torch.float64
    )


def _check(x, w13, w2, topk_weights, topk_ids, config, b13, b2) -> None:
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [T, H], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    t, h = x.shape
    if w2.dim() != 3 or w2.shape[1] != h:
        raise ValueError(f"w2: expected shape [E, {h}, I], got {list(w2.shape)}")
    e, _, i = w2.shape
    rows = 2 * i if config.gated else i
    expected = {
        "w13": (w13, (e, rows, h)),
        "topk_weights": (topk_weights, (t, config.top_k)),
        "topk_ids": (topk_ids, (t, config.top_k)),
        "b13": (b13, (e, rows)),
        "b2": (b2, (e, h)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {tensor.device}")
    for name, tensor in (("w13", w13), ("w2", w2), ("b13", b13), ("b2", b2)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {tensor.dtype}")
    if topk_weights is not None and topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights: expected dtype float32, got {topk_weights.dtype}")
    if topk_ids is not None and topk_ids.dtype != torch.int32:
        raise TypeError(f"topk_ids: expected dtype int32, got {topk_ids.dtype}")
    if w2.device != x.device:
        raise ValueError(f"w2: expected device {x.device}, got {w2.device}")


def fused_experts_torch(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None) -> torch.Tensor:
    """Plain-PyTorch reference of ``fused_experts`` (one expert at a time, fp32 math): [T, H] in x.dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for expert in range(w13.shape[0]):
        token, pick = (topk_ids == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        weight = topk_weights[token, pick].unsqueeze(1)
        rows = xf[token] * weight if config.weights_on_input else xf[token]
        h = rows @ w13[expert].float().t()
        if b13 is not None:
            h = h + b13[expert].float()
        y = act_and_mul_torch(h, config) @ w2[expert].float().t()
        if b2 is not None:
            y = y + b2[expert].float()
        out.index_add_(0, token, y if config.weights_on_input else y * weight)
    return out.to(x.dtype)
