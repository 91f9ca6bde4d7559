"""The implementation registry: every MoE expert implementation is a named function of one signature.

An implementation computes the routed experts of one MoE layer, routing already done::

    fn(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None) -> out

    x             [T, H]      activations (fp32 / fp16 / bf16), contiguous
    w13           [E, 2I, H]  gate rows then up rows ([E, I, H] when config.gated is False)
    w2            [E, H, I]
    topk_weights  [T, K]      float32
    topk_ids      [T, K]      int32, every id in [0, E)
    b13, b2       [E, 2I] / [E, H] expert biases or None
    out           [T, H]      x.dtype: sum_k w[t,k] * expert_{id[t,k]}(x[t])
                              (config.weights_on_input: sum_k expert_{id[t,k]}(w[t,k] * x[t]))

Inputs arrive validated by ``tilemoe.functional``. Implementations add themselves with
``@register_impl(...)`` in their own module; ``tilemoe.impls`` imports the built-in modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ExpertsFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: ExpertsFn
    description: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    level: int | None = None  # rung on the `tilemoe journey` ladder; None for tilemoe's own kernels
    auto_priority: int = 0  # impl="auto" takes the highest priority available on the device
    is_available: Callable[[], bool] | None = None
    distributed: bool = False  # needs a process group (expert parallelism); never picked by "auto"
    # routing and experts in one: from_logits(x, w13, w2, router_logits, *, config, correction_bias=None, b13=None,
    # b2=None) -> out, the routing exactly tilemoe.ops.route.route_fast's (moe_forward and the bench's timed layer
    # call it when given router logits); None: route first, then fn
    from_logits: Callable[..., torch.Tensor] | None = None
    tuned: bool = False  # its kernels take their config from tilemoe.tuning.pick_config (bench column kernel_config)

    def available(self, device: str | torch.device | None = None) -> bool:
        if device is not None and torch.device(device).type not in self.devices:
            return False
        return self.is_available is None or bool(self.is_available())


_REGISTRY: dict[str, Implementation] = {}


def register_impl(
    name: str,
    *,
    description: str,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    level: int | None = None,
    auto_priority: int = 0,
    is_available: Callable[[], bool] | None = None,
    distributed: bool = False,
    from_logits: Callable[..., torch.Tensor] | None = None,
    tuned: bool = False,
    replace: bool = False,
) -> Callable[[ExpertsFn], ExpertsFn]:
    """Decorator adding ``fn`` to the registry under ``name``.

    Raises ``ValueError`` when ``name`` is taken and ``replace`` is False.
    """

    def add(fn: ExpertsFn) -> ExpertsFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"register_impl: name {name!r} is already registered")
        _REGISTRY[name] = Implementation(
            name=name,
            fn=fn,
            description=description,
            devices=tuple(devices),
            level=level,
            auto_priority=auto_priority,
            is_available=is_available,
            distributed=distributed,
            from_logits=from_logits,
            tuned=tuned,
        )
        return fn

    return add


def unregister_impl(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_impl(name: str) -> Implementation:
    """The registered implementation ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"impl: expected one of {sorted(_REGISTRY)}, got {name!r}") from None


def all_impls() -> list[Implementation]:
    return sorted(_REGISTRY.values(), key=lambda i: (i.level is None, i.level or 0, i.name))


def available_impls(device: str | torch.device | None = None) -> list[str]:
    """Names of implementations that can run (on ``device`` when given), ladder order first."""
    return [impl.name for impl in all_impls() if impl.available(device)]


def resolve_impl(name: str, device: torch.device) -> Implementation:
    """``auto`` -> the highest-priority single-device implementation available on ``device``."""
    if name != "auto":
        impl = get_impl(name)
        if not impl.available(device):
            raise ValueError(
                f"impl: {name!r} is not available on device {device} (available there: {available_impls(device)})"
            )
        return impl
    candidates = [i for i in _REGISTRY.values() if not i.distributed and i.available(device)]
    if not candidates:
        raise ValueError(f"impl: no implementation is available on device {device}")
    return max(candidates, key=lambda i: (i.auto_priority, -(i.level or 0)))
