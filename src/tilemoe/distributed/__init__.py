"""Expert parallelism: ExpertPlacement, the dispatch / combine backends, the EP layer.

    from tilemoe.distributed import init_distributed, apply_expert_parallel
    group = init_distributed()                      # torchrun env; NCCL on GPU, gloo on CPU; 60 s timeout
    ep_layer = apply_expert_parallel(moe, group)    # keeps this rank's experts of a tilemoe.MoE
    out = ep_layer(x)                               # x: this rank's tokens

Importing this package registers ``epmoe`` in the implementation registry (``distributed=True``, used
through ``ep_context``). See docs/expert_parallel.md.
"""

from tilemoe.distributed.context import EPContext, current_ep_context, ep_context, set_ep_context
from tilemoe.distributed.epmoe import DispatchHandle, EPDispatcher, RecvMeta
from tilemoe.distributed.layer import ExpertParallelMoE, apply_expert_parallel, best_local_impl, expert_shard
from tilemoe.distributed.placement import ExpertPlacement
from tilemoe.distributed.runtime import DEFAULT_TIMEOUT_S, check_consistent, init_distributed
from tilemoe.impls import ep_epmoe as _ep_epmoe  # noqa: F401  (registers impl "epmoe")


def dispatch(dispatcher: EPDispatcher, x, topk_ids, topk_weights):
    """``dispatcher.dispatch(x, topk_ids, topk_weights) -> (recv_x, recv_meta, handle)``."""
    return dispatcher.dispatch(x, topk_ids, topk_weights)


def combine(dispatcher: EPDispatcher, y, handle, apply_weights: bool = True):
    """``dispatcher.combine(y, handle) -> out [T, H]``."""
    return dispatcher.combine(y, handle, apply_weights=apply_weights)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DispatchHandle",
    "EPContext",
    "EPDispatcher",
    "ExpertParallelMoE",
    "ExpertPlacement",
    "RecvMeta",
    "apply_expert_parallel",
    "best_local_impl",
    "check_consistent",
    "combine",
    "current_ep_context",
    "dispatch",
    "ep_context",
    "expert_shard",
    "init_distributed",
    "set_ep_context",
]
