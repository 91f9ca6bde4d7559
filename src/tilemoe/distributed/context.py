"""The current expert-parallel context: how the registry's ``epmoe`` implementation finds its process group.

Registry implementations have one signature, ``fn(x, w13, w2, topk_weights, topk_ids, *, config, ...)``, with no
room for a process group. ``impl="epmoe"`` therefore reads the group, placement and capacity from a
module-level context set with ``with ep_context(group, placement=...):`` (or ``set_ep_context``). The impl is
registered with ``distributed=True``, so ``impl="auto"`` never picks it, and it reports itself unavailable while
no context is set.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from tilemoe.distributed.placement import ExpertPlacement


@dataclass
class EPContext:
    group: dist.ProcessGroup | None
    placement: ExpertPlacement | None = None  # None: contiguous over the group
    capacity: int | None = None
    local_impl: str = "auto"


_CURRENT: list[EPContext] = []


def current_ep_context() -> EPContext | None:
    return _CURRENT[-1] if _CURRENT else None


def set_ep_context(context: EPContext | None) -> None:
    """Replace the current context (None clears it)."""
    _CURRENT.clear()
    if context is not None:
        _CURRENT.append(context)


@contextmanager
def ep_context(group: dist.ProcessGroup | None = None, **kwargs):
    """``with ep_context(group, placement=..., capacity=..., local_impl=...):`` makes impl="epmoe" usable."""
    _CURRENT.append(EPContext(group=group, **kwargs))
    try:
        yield _CURRENT[-1]
    finally:
        _CURRENT.pop()
