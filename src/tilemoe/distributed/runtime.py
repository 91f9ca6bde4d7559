"""Process groups with bounded waits, and the cross-rank consistency check every EP layer runs at init.

A rank that dies or stops answering must end every other rank with an error, never a hang: every process
group tilemoe creates has a timeout (default ``DEFAULT_TIMEOUT_S``); gloo raises when it passes (or at once
when the peer's socket closes); NCCL's watchdog aborts the communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING,
set here when the user has not) and the process ends with the timeout named.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_TIMEOUT_S = DEFAULT_TIMEOUT_S


def init_distributed(
    backend: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> dist.ProcessGroup:
    """``init_process_group`` with a timeout; returns the default group (already initialised: returned as is).

    backend: "nccl" when CUDA is present, else "gloo". init_method: default "env://" (torchrun's variables).
    Raises ValueError on a non-positive timeout.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
    if dist.is_initialized():
        return dist.group.WORLD
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "0")
    kwargs = {"backend": backend, "timeout": timedelta(seconds=timeout_s), "init_method": init_method or "env://"}
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    if backend == "nccl" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank if rank is not None else 0)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
    dist.init_process_group(**kwargs)
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    return dist.group.WORLD


def group_timeout() -> timedelta:
    """The timeout ``init_distributed`` gave the default group (DEFAULT_TIMEOUT_S when it did not create it):
    the one subgroups get, so that they too never wait unbounded."""
    return timedelta(seconds=_TIMEOUT_S)


def check_consistent(fields: dict, group: dist.ProcessGroup | None = None, what: str = "ExpertParallelMoE") -> None:
    """All-gather ``fields`` (plain values) and raise the same ValueError on every rank when they differ.

    The message names each differing field, its values and the ranks holding each value.
    """
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, fields, group=group)
    problems = []
    for key in sorted({k for g in gathered for k in g}):
        by_value: dict[str, list[int]] = {}
        for rank, g in enumerate(gathered):
            by_value.setdefault(repr(g.get(key, "<missing>")), []).append(rank)
        if len(by_value) > 1:
            parts = "; ".join(f"{value} on ranks {ranks}" for value, ranks in by_value.items())
            problems.append(f"{key!r}: {parts}")
    if problems:
        raise ValueError(f"{what}: configuration differs across ranks: " + " | ".join(problems))
