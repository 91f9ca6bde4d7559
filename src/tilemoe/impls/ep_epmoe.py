"""``epmoe`` in the registry: the expert-parallel all-to-all backend behind the one implementation signature.

Needs a process group, taken from ``tilemoe.distributed.ep_context`` (see ``tilemoe.distributed.context``).
``w13`` / ``w2`` may hold all E experts (this rank's are picked by the placement) or exactly this rank's
experts. Registered on ``import tilemoe.distributed``; ``distributed=True`` keeps it out of impl="auto".
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tilemoe.distributed.context import current_ep_context
from tilemoe.distributed.epmoe import EPDispatcher
from tilemoe.distributed.placement import ExpertPlacement
from tilemoe.impls._registry import register_impl


def _available() -> bool:
    return dist.is_available() and dist.is_initialized() and current_ep_context() is not None


_DISPATCHERS: dict[tuple, EPDispatcher] = {}


@register_impl(
    "epmoe",
    description="expert parallel: all_to_all_single dispatch, local grouped experts, all-to-all combine",
    distributed=True,
    is_available=_available,
    replace=True,
)
def epmoe_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    from tilemoe.distributed.layer import best_local_impl, expert_shard

    ctx = current_ep_context()
    if ctx is None or not dist.is_initialized():
        raise ValueError("impl 'epmoe': expected an expert-parallel context (tilemoe.distributed.ep_context), got none")
    ep, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
    placement = ctx.placement or ExpertPlacement.contiguous(config.num_experts, ep)
    local = placement.experts_of(rank)
    if w13.shape[0] == config.num_experts and len(local) != config.num_experts:
        w13, w2 = expert_shard(w13, local), expert_shard(w2, local)
        b13 = None if b13 is None else expert_shard(b13, local)
        b2 = None if b2 is None else expert_shard(b2, local)
    elif w13.shape[0] != len(local):
        raise ValueError(
            f"w13: expected all {config.num_experts} experts or this rank's {len(local)}, got {w13.shape[0]}"
        )
    key = (id(ctx.group), placement.owner, ctx.capacity)
    if key not in _DISPATCHERS:
        _DISPATCHERS[key] = EPDispatcher(placement, ctx.group, capacity=ctx.capacity)
    dispatcher = _DISPATCHERS[key]
    recv_x, meta, handle = dispatcher.dispatch(x, topk_ids, topk_weights)
    if local and recv_x.shape[0]:
        from tilemoe.functional import experts_forward

        impl = best_local_impl(x.device) if ctx.local_impl == "auto" else ctx.local_impl
        y = experts_forward(
            recv_x,
            w13,
            w2,
            meta.weights.unsqueeze(1),
            meta.local_ids.unsqueeze(1),
            config=config.replace(num_experts=len(local), top_k=1),
            impl=impl,
            b13=b13,
            b2=b2,
        )
    else:
        y = torch.zeros_like(recv_x)
    return dispatcher.combine(y, handle, apply_weights=False)
