"""Expert activations: act(gate) * up for gated MLPs, act(h) for plain ones.

``act_and_mul_torch`` is the reference every kernel epilogue is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilemoe.config import MoEConfig


def activation_torch(h: torch.Tensor, name: str) -> torch.Tensor:
    """Elementwise activation by name (silu, gelu, gelu_tanh, relu)."""
    if name == "silu":
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu(h)
    raise ValueError(f"activation: expected silu, gelu, gelu_tanh or relu here, got {name!r}")


def swigluoai_torch(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def act_and_mul_torch(h: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """h [..., 2I] (gate then up) -> [..., I] when gated; h [..., I] -> act(h) when plain."""
    if not config.gated:
        return activation_torch(h, config.activation)
    i = h.shape[-1] // 2
    gate, up = h[..., :i], h[..., i:]
    if config.activation == "swigluoai":
        return swigluoai_torch(gate, up, config.swiglu_alpha, config.swiglu_limit)
    return activation_torch(gate, config.activation) * up
