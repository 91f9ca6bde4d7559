"""Full-layer timing (``tilemoe bench --timed-scope layer``): router GEMM + routing + routed experts in one call.

The timed callable, the same for every implementation::

    weights, ids = layer_route(x, router_weight, correction_bias)
        16-bit x on CUDA, 8 < T <= ROUTER_PARTS_MAX_TOKENS: ``route_tokens`` (the router GEMM on the tensor cores
        split over H, float32 parts summed by the routing kernel; what ``MoE`` does); else
        logits = layer_router_logits(x, router_weight)   [T, E]: on CUDA for T <= ROUTER_KERNEL_MAX_TOKENS (8) the
                                                   float32 router kernel (tilemoe.ops.router), else x @ router^T
                                                   in the bench dtype (cuBLAS; router_weight [E, H], bench dtype)
        weights, ids = route(logits, correction_bias)  route_triton on CUDA (what moe_forward does), routing.route
                                                   on CPU
    out = impl.fn(x, w13, w2, weights, ids)
                                                   or, where route_tokens does not run, for an implementation that
                                                   routes inside its kernels (``Implementation.from_logits``, e.g.
                                                   triton's decode path),
    out = impl.from_logits(x, w13, w2, logits, correction_bias)     as moe_forward does

A scenario (random / balanced / imbalanced / zipf / trace) still decides which experts each token goes to: the
router is built so that its logits pick exactly the scenario's ids, and the routing kernel really runs on them.

    router_weight[:, :E] = ROUTER_GAIN * identity      router_weight[:, E:] = tiny noise (logit noise ~1e-3)
    x[t, :E] = target[t] / ROUTER_GAIN                 (the rest of x stays the scenario's random input)
    target[t, e] = CHOSEN_TOP - j * step  for the j-th scenario id of token t   (step >= 1/16, j = 0 .. K-1)
                 = (last chosen) - NOT_CHOSEN_GAP  for the other experts

so logits[t] = target[t] + noise: the scenario's K experts lead, in slot order, under softmax, sigmoid, group
scores and the correction bias alike (the bias is drawn tiny: it moves nothing here, but is read and added).
The margins are modest on purpose: for K <= 13 the chosen logits lie in [0.25, 1] and the others 1/4 below
the last chosen one (in [0, 0.75]), so the weights stay near what a random router gives (DeepSeek-V2's
unnormalised softmax * 16 sums to about 1, not 16, which would make bf16 outputs too large for the correctness
gate's absolute tolerance). Targets are multiples of 1/16 and ROUTER_GAIN is 4, so x and the logits hold them
exactly even in bf16, 15x above the noise (1/16 step vs 1e-3 * 4 sigma). ``check_layer_ids`` asserts once,
before timing, that the routing gives the scenario's ids.

Some tokens cannot be steered; if any, the scenario's ids are passed through to the experts (the router GEMM and
the routing kernel still run on every token, the row's note says so):
  * a group-limited routing (topk_group < n_group) and a token whose K ids span more than topk_group groups
    (balanced / imbalanced / zipf ids ignore groups; ``random`` ids come from the routing itself and never do);
  * hidden_size < num_experts: x has too few columns to carry a target per expert;
  * a trace token that repeats an expert id.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tilemoe.config import MoEConfig
from tilemoe.ops.route import route_fast, route_tokens
from tilemoe.ops.router import router_logit_parts, router_logits_triton, uses_router_kernel, uses_router_parts

ROUTER_GAIN = 4.0
CHOSEN_TOP = 1.0
CHOSEN_SPAN = 0.75  # the K chosen logits span [CHOSEN_TOP - CHOSEN_SPAN, CHOSEN_TOP] while K - 1 <= 12
NOT_CHOSEN_GAP = 0.25  # the other experts' logit sits this far below the last chosen one
LOGIT_NOISE = 1e-3
BIAS_SCALE = 1e-4  # correction bias values in [0, 1e-4): far below the 1/16 logit steps between the chosen

__all__ = [
    "check_layer_ids",
    "layer_fn",
    "layer_route",
    "layer_router_logits",
    "make_router_weights",
    "reachable_tokens",
    "route_fn",
    "steer_input",
]


def route_fn(device: torch.device) -> Callable:
    """The routing ``moe_forward`` uses on ``device``: ``tilemoe.ops.route.route_fast`` (the Triton kernel for CUDA
    logits, plain PyTorch elsewhere)."""
    return route_fast


def layer_router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """The router GEMM of the timed layer as logits [T, E], the same for every implementation: the Triton router
    kernel (float32 logits) where ``tilemoe.ops.router.uses_router_kernel`` (a decode-sized batch on CUDA, where
    cuBLAS's GEMM is a 4-6 us weight stream); the sum of ``router_logit_parts`` (float32) where ``uses_router_parts``
    (what ``layer_route`` routes there); x @ router^T in x's dtype (cuBLAS, or the CPU) otherwise."""
    if uses_router_kernel(x):
        return router_logits_triton(x, router_weight)
    if uses_router_parts(x, router_weight):
        return router_logit_parts(x, router_weight).sum(0)
    return torch.nn.functional.linear(x, router_weight)


def layer_route(
    x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The timed layer's router GEMM and routing, (topk_weights, topk_ids): ``route_tokens`` where
    ``uses_router_parts``, else ``route_fn`` on ``layer_router_logits``."""
    if uses_router_parts(x, router_weight):
        return route_tokens(x, router_weight, config, correction_bias=correction_bias)
    return route_fn(x.device)(layer_router_logits(x, router_weight), config, correction_bias=correction_bias)


def make_router_weights(
    config: MoEConfig, *, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> dict[str, torch.Tensor | None]:
    """{"router_weight": [E, H] in ``dtype``, "correction_bias": [E] float32 or None} (see the module docstring).

    With hidden_size < num_experts the router is plain random (scenario ids are then passed through).
    """
    e, h = config.num_experts, config.hidden_size
    if h >= e:
        weight = torch.zeros(e, h)
        weight[:, :e] = ROUTER_GAIN * torch.eye(e)
        if h > e:
            weight[:, e:] = torch.randn(e, h - e, generator=generator) * (LOGIT_NOISE / (h - e) ** 0.5)
    else:
        weight = torch.randn(e, h, generator=generator) * h**-0.5
    bias = torch.rand(e, generator=generator) * BIAS_SCALE if config.score_correction_bias else None
    return {
        "router_weight": weight.to(device, dtype),
        "correction_bias": None if bias is None else bias.to(device),
    }


def reachable_tokens(topk_ids: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """[T] bool: tokens whose ids some router logits can produce: K distinct ids in at most topk_group groups
    (group-limited routings), and hidden_size >= num_experts."""
    t = topk_ids.shape[0]
    if config.hidden_size < config.num_experts:
        return torch.zeros(t, dtype=torch.bool, device=topk_ids.device)
    ordered = topk_ids.long().sort(dim=1).values
    reachable = (ordered[:, 1:] != ordered[:, :-1]).all(dim=1)  # a trace may repeat an id within a token
    grouped = config.routing in ("sigmoid_grouped_topk", "softmax_grouped_topk")
    if grouped and config.topk_group < config.n_group:
        groups = topk_ids.long() // (config.num_experts // config.n_group)
        used = torch.zeros(t, config.n_group, dtype=torch.bool, device=topk_ids.device).scatter_(1, groups, True)
        reachable &= used.sum(dim=1) <= config.topk_group
    return reachable


def _targets(topk_ids: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """[T, E] float32 logits that rank the K ids of each token first, in slot order."""
    t, k = topk_ids.shape
    step = max(1, int(CHOSEN_SPAN * 16) // max(1, k - 1)) / 16  # a multiple of 1/16: exact in bf16
    chosen = CHOSEN_TOP - step * torch.arange(k, dtype=torch.float32, device=topk_ids.device)
    rest = CHOSEN_TOP - step * (k - 1) - NOT_CHOSEN_GAP
    target = torch.full((t, config.num_experts), rest, dtype=torch.float32, device=topk_ids.device)
    return target.scatter_(1, topk_ids.long(), chosen.expand(t, k).contiguous())


def steer_input(x: torch.Tensor, topk_ids: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """A copy of x [T, H] whose first E columns make the router of ``make_router_weights`` pick ``topk_ids``.

    x is returned unchanged (not copied) when hidden_size < num_experts.
    """
    e = config.num_experts
    if config.hidden_size < e:
        return x
    out = x.clone()
    out[:, :e] = (_targets(topk_ids, config) / ROUTER_GAIN).to(x.dtype)
    return out


def check_layer_ids(got: torch.Tensor, scenario: torch.Tensor, reachable: torch.Tensor, scenario_name: str) -> None:
    """Raise RuntimeError unless the routed ids equal the scenario's on every reachable token."""
    differ = (got != scenario).any(dim=1) & reachable
    if bool(differ.any()):
        t = int(differ.nonzero()[0, 0])
        raise RuntimeError(
            f"timed_scope 'layer': the steered router did not reproduce the {scenario_name!r} scenario's ids on "
            f"{int(differ.sum())} of {int(reachable.sum())} tokens (token {t}: routed {got[t].tolist()}, "
            f"scenario {scenario[t].tolist()}); use --timed-scope experts for this configuration"
        )


def layer_fn(
    experts_fn: Callable,
    weights: dict,
    config: MoEConfig,
    *,
    pass_through: bool,
    from_logits: Callable | None = None,
) -> Callable:
    """The timed callable of one implementation: ``fn((x, _, scenario_ids)) -> out [T, H]``.

    ``pass_through``: give the experts the scenario's ids instead of the routed ones (routing still runs).
    ``from_logits``: the implementation's routing-and-experts call (``Implementation.from_logits``), used in place
    of the routing then ``experts_fn`` unless ``pass_through`` (it routes as ``route_fn`` does, so the scenario's
    ids are the ones it computes; ``check_layer_ids`` checks that routing once before timing).
    """
    w13, w2, b13, b2 = weights["w13"], weights["w2"], weights["b13"], weights["b2"]
    router_weight, bias = weights["router_weight"], weights["correction_bias"]

    def fn(inp):
        x, _, scenario_ids = inp
        if from_logits is not None and not pass_through and not uses_router_parts(x, router_weight):
            logits = layer_router_logits(x, router_weight)
            return from_logits(x, w13, w2, logits, config=config, correction_bias=bias, b13=b13, b2=b2)
        topk_weights, topk_ids = layer_route(x, router_weight, config, bias)
        if pass_through:
            topk_ids = scenario_ids
        return experts_fn(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)

    return fn
