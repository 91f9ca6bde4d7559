"""Router math: logits -> (topk_weights fp32 [T, K], topk_ids int32 [T, K]).

Every routing function is plain PyTorch and serves as the reference for the Triton routing kernel.
Ties are broken toward the lower expert index (a stable descending sort), so the ids are deterministic.
"""

from __future__ import annotations

import torch

from tilemoe.config import MoEConfig

__all__ = ["route", "router_logits", "topk_stable"]


def topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; equal scores go to the lower index. Returns (values, int64 indices)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] @ weight[E, H]^T (+ bias) in float32 (float64 stays float64)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _renormalize(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def choice_scores(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, choice) [..., E] in logits' dtype and device. scores: the sigmoid of the logits for the sigmoid
    routings, else their softmax (a grouped routing's weights); choice: scores + ``correction_bias`` (moved to the
    scores' device and dtype), whose order picks the experts (only a grouped routing takes a bias; without one, choice
    is scores). Raises ValueError: a bias not [E]."""
    scores = torch.sigmoid(logits) if config.routing.startswith("sigmoid") else torch.softmax(logits, dim=-1)
    if correction_bias is None:
        return scores, scores
    if correction_bias.shape != (config.num_experts,):
        raise ValueError(f"correction_bias: expected shape [{config.num_experts}], got {list(correction_bias.shape)}")
    return scores, scores + correction_bias.to(device=scores.device, dtype=scores.dtype)


def group_scores(choice_scores: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """What each expert group is worth to a grouped routing, from the (biased) choice scores [T, E]: [T, n_group].
    sigmoid_grouped_topk (DeepSeek-V3): its two best scores summed; softmax_grouped_topk (DeepSeek-V2): its best."""
    t, e = choice_scores.shape
    per_group = e // config.n_group
    grouped = choice_scores.view(t, config.n_group, per_group)
    if config.routing == "sigmoid_grouped_topk":
        return topk_stable(grouped, min(2, per_group))[0].sum(dim=-1)
    return grouped.max(dim=-1).values


def _grouped_topk(scores: torch.Tensor, choice_scores: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """Pick top-k experts among the topk_group best groups (``group_scores``). Returns int64 ids [T, K]."""
    t, e = scores.shape
    per_group = e // config.n_group
    scores_of_groups = group_scores(choice_scores, config)
    _, group_ids = topk_stable(scores_of_groups, config.topk_group)
    group_mask = torch.zeros_like(scores_of_groups, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, config.n_group, per_group).reshape(t, e)
    masked = choice_scores.masked_fill(~expert_mask, float("-inf"))
    return topk_stable(masked, config.top_k)[1]


def route(
    logits: torch.Tensor,
    config: MoEConfig,
    *,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens.

    Args:
        logits: router logits [T, E], any float dtype (computed in float32, float64 kept).
        config: the layer's MoEConfig (routing, top_k, renormalize, groups, scaling).
        correction_bias: [E] score correction bias (DeepSeek-V3 ``e_score_correction_bias``); it moves
            the choice of experts only, never the weights.
    Returns:
        topk_weights [T, K] float32 (float64 for float64 logits), topk_ids [T, K] int32.
    Raises:
        ValueError: logits not [T, E] with E == config.num_experts; bias not [E].
    """
    if logits.dim() != 2 or logits.shape[1] != config.num_experts:
        raise ValueError(f"router_logits: expected shape [T, {config.num_experts}], got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"router_logits: expected a floating dtype, got {logits.dtype}")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(compute)
    k = config.top_k
    kind = config.routing

    if kind == "softmax_topk":
        scores = torch.softmax(logits, dim=-1)
        weights, ids = topk_stable(scores, k)
        if config.renormalize:
            weights = _renormalize(weights)
    elif kind == "topk_softmax":
        values, ids = topk_stable(logits, k)
        weights = torch.softmax(values, dim=-1)
    elif kind == "sigmoid_top1_input_scaled":
        values, ids = topk_stable(logits, k)
        weights = torch.sigmoid(values)
    elif kind in ("sigmoid_grouped_topk", "softmax_grouped_topk"):
        scores, choice = choice_scores(logits, config, correction_bias)
        ids = _grouped_topk(scores, choice, config)
        weights = scores.gather(1, ids)
        if config.renormalize:
            weights = _renormalize(weights)
    else:  # pragma: no cover - MoEConfig.validate rejects unknown routings
        raise ValueError(f"config.routing: unknown routing {kind!r}")

    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return weights.contiguous(), ids.to(torch.int32).contiguous()
