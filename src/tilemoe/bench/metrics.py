"""What one MoE layer call must compute and move, given its routing; loads and the roofline bound.

For the routed experts (timed_scope "experts": routing done before the timed call):
    FLOPs  = 2 * T*K * (H * w13_rows + I * H)              (both expert matmuls; w13_rows = 2I gated, I plain)
    bytes  = weights (and biases) of the experts actually hit      (each read once at best)
           + x read [T, H] + out written [T, H]                    (activation dtype)
           + topk_ids and topk_weights read [T, K] (4 bytes each)  (the router's output)
With ``router=True`` (timed_scope "layer": router GEMM + routing + experts) the router GEMM adds
    FLOPs  + 2 * T*H*E
    bytes  + router weight [E, H] + logits [T, E]                  (activation dtype)
Intermediate activations are not counted: a fused kernel need not send them to memory.
    roofline time = max(FLOPs / matmul rate, bytes / copy bandwidth)  (both measured, see roofline.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tilemoe.config import MoEConfig


@dataclass(frozen=True)
class LoadStats:
    max_load: int
    min_load: int
    avg_load: float
    max_imbalance: float  # max_load / avg_load (1.0 perfectly balanced; 0 tokens -> 0.0)
    experts_hit: int


def load_stats(topk_ids: torch.Tensor, num_experts: int) -> LoadStats:
    """Per-expert load statistics of a routing (topk_ids [T, K])."""
    loads = torch.bincount(topk_ids.reshape(-1).long().cpu(), minlength=num_experts)
    avg = topk_ids.numel() / num_experts
    mx = int(loads.max()) if loads.numel() else 0
    return LoadStats(
        max_load=mx,
        min_load=int(loads.min()) if loads.numel() else 0,
        avg_load=avg,
        max_imbalance=mx / avg if avg > 0 else 0.0,
        experts_hit=int((loads > 0).sum()),
    )


def layer_flops(config: MoEConfig, num_tokens: int, router: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the routed experts for ``num_tokens`` tokens (+ the router GEMM)."""
    h, i = config.hidden_size, config.intermediate_size
    flops = 2 * num_tokens * config.top_k * (h * config.w13_rows + i * h)
    if router:
        flops += 2 * num_tokens * h * config.num_experts
    return flops


def layer_bytes(config: MoEConfig, num_tokens: int, experts_hit: int, element_size: int, router: bool = False) -> int:
    """Bytes that must move for one call (see the module docstring; ``router``: with the router GEMM)."""
    weights = experts_hit * config.expert_weight_elements()
    if config.expert_bias:
        weights += experts_hit * (config.w13_rows + config.hidden_size)
    activations = 2 * num_tokens * config.hidden_size
    router_gemm = config.num_experts * (config.hidden_size + num_tokens) if router else 0  # weight + logits
    routing = num_tokens * config.top_k * (4 + 4)
    return element_size * (weights + activations + router_gemm) + routing


def roofline_seconds(flops: float, nbytes: float, matmul_flops_per_s: float, copy_bytes_per_s: float) -> float:
    """Lower bound on the time of a call: the slower of compute and memory at the measured peak rates."""
    return max(flops / matmul_flops_per_s, nbytes / copy_bytes_per_s)
