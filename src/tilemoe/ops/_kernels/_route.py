"""Triton kernels: router logits -> top-k weights and ids, one program per token.

Dimension letters: T tokens, E experts, K top-k, G expert groups (E = G * P, P experts per group).
    logits  [T, E]  any float dtype, math in float32; or [NUM_PARTS, T, E] float32 parts whose sum over the first
                    dimension is the logits (``_router._router_parts_kernel``'s split of H), summed as loaded
    bias    [E]     score correction bias (grouped routings only): moves the choice, never the weights
    weights [T, K]  float32
    ids     [T, K]  int32; equal scores go to the lower expert index (like ``tilemoe.routing.topk_stable``)

Non-finite logits: a token's K ids are always distinct experts in [0, E), whatever its logits hold, in the order
``torch.sort`` gives (``_rank``: NaN, +inf, the numbers, -inf; ties to the lower index), so the kernels pick what
the reference picks; a NaN picked makes the token's weights, hence its output row, NaN. A token's logits never move
another token's routing. (Before, a NaN made ``score == max`` false everywhere and the id the index past the block,
expert E: a read past the expert weights in the GEMMs.)

``_route_kernel`` (flat routings), SCORE: 0 softmax then top-k (renormalised when RENORMALIZE); 1 top-k on
the logits then softmax over the K; 2 top-k on the logits then sigmoid.

``_grouped_route_kernel`` (``sigmoid_grouped_topk``, ``softmax_grouped_topk``), SCORE: 0 softmax, 1 sigmoid.
The token's E scores are held as a [G, P] tile (expert g * P + p at row g, column p), so the per-group
reductions are reductions along axis 1. choice = score + bias; a group is worth the sum of its two best
choices (GROUP_SCORE 0, DeepSeek-V3) or its best choice (1, DeepSeek-V2); the TOPK_GROUP best groups are kept
(ties to the lower group) and the top-K choices inside them picked; weights are the unbiased scores of the
picked experts. Both kernels multiply the weights by ``scale`` (routed_scaling_factor).
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._pdl import _pdl_prologue

# The largest float32. Ranks (``_rank``) are finite for every score but NaN (+inf): +inf ranks as this, -inf as its
# negative, so -inf itself is free to mark a padding lane or a picked expert, below every real choice.
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _rank(scores):
    """The order the top-k follows, as ``torch.sort`` orders: NaN first, then +inf, the numbers, -inf; always above
    -inf (a real score ties with an infinity only at exactly +-_FLOAT32_MAX)."""
    ranked = tl.where(scores == float("inf"), _FLOAT32_MAX, tl.where(scores == float("-inf"), -_FLOAT32_MAX, scores))
    return tl.where(scores != scores, float("inf"), ranked)


@triton.jit
def _score_of(rank):
    """The score behind a rank (``_rank`` undone)."""
    score = tl.where(rank == _FLOAT32_MAX, float("inf"), tl.where(rank == -_FLOAT32_MAX, float("-inf"), rank))
    return tl.where(rank == float("inf"), float("nan"), score)


# The flat routing's sums (the softmax's divisor, the renormalisation's) are taken in fixed point, 2**-48 a unit:
# integer sums come out the same in every order, so the layout a kernel reduces in (the routing kernel's one warp,
# the decode GEMM 1's several) cannot move a weight's last bit. Every term is in [0, 1], so up to 2**15 terms fit an
# int64; dropping what is under 2**-48 of each moves a sum of at least 1 (the softmax's) by under 2**-33.
_FIXED_ONE = tl.constexpr(281474976710656.0)  # 2**48


@triton.jit
def _order_free_sum(terms):
    """The float32 sum of ``terms`` ([N] float32 in [0, 1], or NaN) in fixed point: the same bits whatever order
    the reduction takes; NaN when a term is NaN."""
    fixed = tl.sum(tl.where(terms == terms, terms * _FIXED_ONE, 0.0).to(tl.int64), axis=0)
    has_nan = tl.max(tl.where(terms != terms, 1, 0), axis=0) > 0
    return tl.where(has_nan, float("nan"), fixed.to(tl.float32) * (1.0 / _FIXED_ONE))


@triton.jit
def _clamp_min_sum(total):
    """The renormalisation's divisor, at least 1e-20, NaN kept (as torch's clamp_min; tl.maximum may drop it)."""
    return tl.where(total < 1e-20, 1e-20, total)


@triton.jit
def _token_logits(logits_ptr, experts, in_range, stride_le, stride_lp, num_parts, BLOCK_PARTS: tl.constexpr):
    """A token's float32 logits at ``experts`` (a [BLOCK_E] or [G, P] tile of indices; ``logits_ptr`` points at the
    token's row of part 0), -inf where not ``in_range``. BLOCK_PARTS > 1: the sum of its ``num_parts`` rows, part p
    at ``stride_lp`` * p, loaded as one tile (the loads in flight together) and summed in float32."""
    if BLOCK_PARTS == 1:
        logits = tl.load(logits_ptr + experts * stride_le, mask=in_range, other=float("-inf")).to(tl.float32)
    else:
        parts = tl.expand_dims(tl.arange(0, BLOCK_PARTS), 1)
        offsets = tl.expand_dims(experts * stride_le, 0)
        mask = tl.expand_dims(in_range, 0)
        if len(experts.shape) == 2:
            parts = tl.expand_dims(parts, 2)
        tile = tl.load(logits_ptr + parts * stride_lp + offsets, mask=mask & (parts < num_parts), other=0.0)
        logits = tl.where(in_range, tl.sum(tile.to(tl.float32), axis=0), float("-inf"))
    return logits


@triton.jit
def _flat_topk(
    logits_ptr,
    stride_le,
    num_experts,
    TOP_K: tl.constexpr,
    SCORE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    stride_lp=0,
    num_parts=1,
    BLOCK_PARTS: tl.constexpr = 1,
):
    """One token's flat routing from its logits row (``logits_ptr`` points at it; ``_token_logits``: the sum of
    ``num_parts`` rows under BLOCK_PARTS > 1): ([BLOCK_K] float32 weights before the scale, [BLOCK_K] int32 ids),
    entries past TOP_K unused. Shared by ``_route_kernel`` and the decode GEMM 1 that routes its own slot
    (``tilemoe.ops._kernels._decode``), so both give the same ids and weights: maxima and ``_order_free_sum`` do
    not depend on the order a kernel's layout reduces in (a float32 ``tl.sum`` does: a last bit apart at E = 35)."""
    experts = tl.arange(0, BLOCK_E)
    in_range = experts < num_experts
    logits = _token_logits(logits_ptr, experts, in_range, stride_le, stride_lp, num_parts, BLOCK_PARTS)
    if SCORE == 0:
        shifted = tl.exp(logits - tl.max(logits, axis=0))
        scores = shifted / _order_free_sum(shifted)
    else:
        scores = logits
    order = tl.where(in_range, _rank(scores), float("-inf"))  # padding lanes and picked experts: -inf
    slots = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.float32)
    picked_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(order, axis=0)  # above -inf: an expert is left (K <= E)
        # lowest index holding the best rank: ties go to the lower expert
        best_id = tl.min(tl.where(order == best, experts, BLOCK_E), axis=0)
        picked = tl.where(slots == k, best, picked)
        picked_ids = tl.where(slots == k, best_id, picked_ids)
        order = tl.where(experts == best_id, float("-inf"), order)
    picked = _score_of(picked)
    valid = slots < TOP_K
    if SCORE == 0:
        weights = picked
        if RENORMALIZE:
            weights = weights / _clamp_min_sum(_order_free_sum(tl.where(valid, weights, 0.0)))
    elif SCORE == 1:
        shifted = tl.where(valid, tl.exp(picked - tl.max(tl.where(valid, picked, float("-inf")), axis=0)), 0.0)
        weights = shifted / _order_free_sum(shifted)
    else:
        weights = 1.0 / (1.0 + tl.exp(-picked))
    return weights, picked_ids


@triton.jit
def _route_kernel(
    logits_ptr,
    stride_lp,
    stride_lt,
    stride_le,
    weights_ptr,
    ids_ptr,
    num_parts,
    num_experts,
    scale,
    TOP_K: tl.constexpr,
    SCORE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    num_tokens=1,
    TOKENS: tl.constexpr = 1,
):
    """TOKENS tokens a program, one after another in an unrolled loop (independent work the compiler may overlap; a
    token past ``num_tokens`` routes the last one again and stores nothing)."""
    _pdl_prologue(PDL)
    slots = tl.arange(0, BLOCK_K)
    valid = slots < TOP_K
    for i in tl.static_range(TOKENS):
        token = tl.program_id(0).to(tl.int64) * TOKENS + i
        in_batch = valid & (token + slots * 0 < num_tokens)  # [BLOCK_K]: the interpreter refuses a scalar mask here
        token = tl.minimum(token, num_tokens - 1)
        weights, ids = _flat_topk(
            logits_ptr + token * stride_lt, stride_le, num_experts, TOP_K, SCORE, RENORMALIZE, BLOCK_E, BLOCK_K,
            stride_lp, num_parts, BLOCK_PARTS,
        )  # fmt: skip
        tl.store(weights_ptr + token * TOP_K + slots, weights * scale, mask=in_batch)
        tl.store(ids_ptr + token * TOP_K + slots, ids, mask=in_batch)


@triton.jit
def _grouped_route_kernel(
    logits_ptr,
    stride_lp,
    stride_lt,
    stride_le,
    bias_ptr,
    stride_be,
    weights_ptr,
    ids_ptr,
    num_parts,
    scale,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCORE: tl.constexpr,
    GROUP_SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    token = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    members = tl.arange(0, BLOCK_P)
    # [G, P] expert index of each tile element; padding columns alias the next group's experts, harmless:
    # their choice is -inf and their score 0, so they never win and add nothing to a weight
    experts = groups[:, None] * PER_GROUP + members[None, :]
    in_range = (groups[:, None] < N_GROUP) & (members[None, :] < PER_GROUP)
    logits = _token_logits(logits_ptr + token * stride_lt, experts, in_range, stride_le, stride_lp, num_parts,
                           BLOCK_PARTS)  # fmt: skip
    if SCORE == 0:
        shifted = tl.exp(logits - tl.max(tl.max(logits, axis=1), axis=0))
        scores = shifted / tl.sum(tl.sum(shifted, axis=1), axis=0)
    else:
        scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts * stride_be, mask=in_range, other=0.0).to(tl.float32)
    choice = tl.where(in_range, _rank(choice), float("-inf"))  # padding lanes and picked experts: -inf

    if TOPK_GROUP < N_GROUP:  # keeping every group changes nothing: skip the group stage
        best = tl.max(choice, axis=1)  # [G]
        group_scores = best
        if GROUP_SCORE == 0:  # needs PER_GROUP >= 2 (the launcher asks for the best alone otherwise)
            # second best of each group: drop one copy of the best (its lowest member), take the max
            first = tl.min(tl.where(choice == best[:, None], members[None, :], BLOCK_P), axis=1)
            rest = tl.where(members[None, :] == first[:, None], float("-inf"), choice)
            group_scores = best + tl.max(rest, axis=1)
        # ranked again (a sum can overflow to -inf), padding groups and kept ones at -inf below every real group
        group_scores = tl.where(groups < N_GROUP, _rank(group_scores), float("-inf"))
        kept = groups < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_scores, axis=0)
            top_group = tl.min(tl.where(group_scores == top, groups, BLOCK_G), axis=0)
            kept = kept | (groups == top_group)
            group_scores = tl.where(groups == top_group, float("-inf"), group_scores)
        # the other groups' experts rank with the kept -inf choices (the reference masks both to -inf), above -inf
        choice = tl.where(in_range & ~kept[:, None], -_FLOAT32_MAX, choice)

    slots = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.float32)
    picked_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)  # above -inf: an expert is left (K <= E)
        top_id = tl.min(tl.min(tl.where(choice == top, experts, BLOCK_G * BLOCK_P), axis=1), axis=0)
        hit = experts == top_id  # the expert's lane, and a padding lane aliasing it (its choice -inf, its score 0)
        weight = tl.sum(tl.sum(tl.where(hit & in_range, scores, 0.0), axis=1), axis=0)
        picked = tl.where(slots == k, weight, picked)
        picked_ids = tl.where(slots == k, top_id, picked_ids)
        choice = tl.where(hit, float("-inf"), choice)
    valid = slots < TOP_K
    weights = picked
    if RENORMALIZE:
        weights = weights / _clamp_min_sum(tl.sum(tl.where(valid, weights, 0.0), axis=0))
    tl.store(weights_ptr + token * TOP_K + slots, weights * scale, mask=valid)
    tl.store(ids_ptr + token * TOP_K + slots, picked_ids, mask=valid)
