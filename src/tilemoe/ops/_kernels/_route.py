"""Triton kernel: router logits -> top-k weights and ids, one program per token.

Dimension letters: T tokens, E experts, K top-k.
    logits  [T, E]  any float dtype, math in float32
    weights [T, K]  float32
    ids     [T, K]  int32; equal scores go to the lower expert index (like ``tilemoe.routing.topk_stable``)
SCORE: 0 softmax then top-k (renormalised when RENORMALIZE); 1 top-k on the logits then softmax over the K;
2 top-k on the logits then sigmoid. Weights are multiplied by ``scale`` (routed_scaling_factor).
"""

import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,
    stride_lt,
    stride_le,
    weights_ptr,
    ids_ptr,
    num_experts,
    scale,
    TOP_K: tl.constexpr,
    SCORE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    in_range = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_lt + experts * stride_le, mask=in_range, other=float("-inf"))
    logits = logits.to(tl.float32)
    if SCORE == 0:
        shifted = tl.exp(logits - tl.max(logits, axis=0))
        scores = shifted / tl.sum(shifted, axis=0)
    else:
        scores = logits
    scores = tl.where(in_range, scores, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.float32)
    picked_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(scores, axis=0)
        # lowest index holding the best score: ties go to the lower expert
        best_id = tl.min(tl.where(scores == best, experts, BLOCK_E), axis=0)
        picked = tl.where(slots == k, best, picked)
        picked_ids = tl.where(slots == k, best_id, picked_ids)
        scores = tl.where(experts == best_id, float("-inf"), scores)
    valid = slots < TOP_K
    if SCORE == 0:
        weights = picked
        if RENORMALIZE:
            weights = weights / tl.maximum(tl.sum(tl.where(valid, weights, 0.0), axis=0), 1e-20)
    elif SCORE == 1:
        shifted = tl.where(valid, tl.exp(picked - tl.max(tl.where(valid, picked, float("-inf")), axis=0)), 0.0)
        weights = shifted / tl.sum(shifted, axis=0)
    else:
        weights = 1.0 / (1.0 + tl.exp(-picked))
    tl.store(weights_ptr + token * TOP_K + slots, weights * scale, mask=valid)
    tl.store(ids_ptr + token * TOP_K + slots, picked_ids, mask=valid)
