"""Run a function on N local processes, each a rank of one process group, and collect what each returned.

Used by the CPU tests (gloo) and by ``tilemoe bench --ep-size N`` when it is not launched by torchrun. Every
wait is bounded: the group gets ``timeout_s``; the parent gives up after ``join_timeout_s``, terminates the
processes still running and says which ranks they were.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch.multiprocessing as mp

from tilemoe.distributed.runtime import DEFAULT_TIMEOUT_S


@dataclass
class RankOutcome:
    rank: int
    ok: bool
    value: object = None  # fn's return value when ok
    error: str = ""  # "ExceptionType: message" when not ok (or the exit code when the process died)


def _worker(rank, world_size, init_method, backend, timeout_s, fn, args, results, env):
    os.environ.update(env)
    os.environ.setdefault("LOCAL_RANK", str(rank))
    try:
        import torch.distributed as dist

        from tilemoe.distributed.runtime import init_distributed

        init_distributed(backend, timeout_s=timeout_s, init_method=init_method, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value, ""))
        with contextlib.suppress(Exception):  # a peer may be gone; the result is already reported
            dist.destroy_process_group()
    except BaseException as error:  # noqa: BLE001  (reported to the parent, which decides)
        results.put((rank, False, None, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"))


def spawn_ranks(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    join_timeout_s: float | None = None,
    init_method: str | None = None,
    rank_offset: int = 0,
    total_world: int | None = None,
    env: dict | None = None,
    start_method: str = "spawn",
) -> list[RankOutcome]:
    """Start ``world_size`` processes calling ``fn(rank, world, *args)`` inside an initialised group.

    fn must be importable (a module-level function). Returns one RankOutcome per local rank, in rank order.
    init_method: default a FileStore in a fresh temporary directory (single host). For multi-host runs give a
    tcp:// address and ``rank_offset`` / ``total_world``. join_timeout_s: default 3 * timeout_s + 60.
    start_method: "spawn" (safe with CUDA), "forkserver" (CPU: children forked from a clean server that has
    imported torch once, so they start fast without inheriting the parent's OpenMP threads), or "fork"
    (only for a parent that has run no parallel torch op: a child forked after OpenMP started can deadlock in
    its first parallel op, seen here as a 4-rank gloo run that never finished).
    A process that neither reports nor exits in time is terminated and reported as a hang.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    total = total_world or world_size
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method: expected spawn, fork or forkserver, got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "tilemoe.distributed.runtime"])
    results = ctx.Queue()
    tmp = None
    if init_method is None:
        tmp = tempfile.mkdtemp(prefix="tilemoe-ep-")
        init_method = f"file://{os.path.join(tmp, 'store')}"
    procs = []
    for local in range(world_size):
        rank = rank_offset + local
        penv = dict(env or {})
        penv["LOCAL_RANK"] = str(local)
        p = ctx.Process(
            target=_worker, args=(rank, total, init_method, backend, timeout_s, fn, args, results, penv), daemon=False
        )
        p.start()
        procs.append((rank, p))
    deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else 3 * timeout_s + 60)
    got: dict[int, RankOutcome] = {}
    while len(got) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value, error = results.get(timeout=0.2)
            got[rank] = RankOutcome(rank, ok, value, error)
        except queue.Empty:
            pass
        for rank, p in procs:
            if rank not in got and not p.is_alive() and p.exitcode is not None:
                # drain once more: the result may be in flight
                try:
                    while True:
                        r, ok, value, error = results.get(timeout=0.5)
                        got[r] = RankOutcome(r, ok, value, error)
                except queue.Empty:
                    pass
                if rank not in got:
                    got[rank] = RankOutcome(rank, False, None, f"process exited with code {p.exitcode}")
    for rank, p in procs:
        if rank not in got:
            got[rank] = RankOutcome(rank, False, None, "hang: no result before the join timeout; terminated")
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    return [got[rank] for rank, _ in procs]


def raise_on_failure(outcomes: list[RankOutcome]) -> list:
    """The values of all ranks, or RuntimeError listing every rank that failed and why."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("ranks failed:\n" + "\n".join(f"rank {o.rank}: {o.error}" for o in failed))
    return [o.value for o in outcomes]
