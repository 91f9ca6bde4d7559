"""``fused`` backend on GPUs: buffers in symmetric memory, device-initiated puts, flag waits, no host sync.

1. At init every rank allocates the symmetric buffers (``fused_ops.buffer_specs``) in the same order, zeroes
   them, exchanges their addresses (``rendezvous``; the tables of peers' base addresses go to the kernels) and
   meets the others once (a process-group barrier), so no peer writes into a buffer still being zeroed.
2. Each forward, on the current stream, no barrier, no host sync: ``fused_layout`` (three small kernels; it also
   advances the epoch counter on the device); one launch of dispatch puts + GEMM 1 (the GEMM programs wait
   for each row-block's flag, own rows first); GEMM 2 storing into the sources' ``ret`` with per-tile
   combine flags; the combine, waiting for those flags. Buffers are reused safely without barriers: a source
   reuses its region on a destination only after that destination said it finished reading it (``done`` /
   combine flags, see ``fused_kernels``), and every flag carries the epoch, so nothing is reset (CUDA-graph
   capturable).
3. Every wait is bounded (``spin_timeout_s``): a peer that stops answering ends the forward with an error
   code on the device, which ``check()`` turns into a RuntimeError (a sync point; the layer never syncs).

Symmetric-memory backends: "cuda" (default, CUDA IPC; one host) or "nvshmem" (``symm_mem.set_backend
("NVSHMEM")``; the same pointer-based puts work where peers are NVLink-mapped, i.e. on one host; across hosts
the peers' buffers have no load/store address and init raises). Settings for one host:
NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_SYMMETRIC_SIZE=4G.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from tilemoe.config import MoEConfig
from tilemoe.distributed.fused_layout import FusedGeometry, fused_layout
from tilemoe.distributed.fused_ops import (
    BUFFER_FIELDS,
    FusedRank,
    FusedTiles,
    buffer_specs,
    combine,
    dispatch_gemm1,
    fused_tiles_for,
    gemm2_put,
)
from tilemoe.distributed.placement import ExpertPlacement

SYMM_MEM_BACKENDS = ("cuda", "nvshmem")
DEFAULT_SPIN_TIMEOUT_S = 30.0
# one poll of a flag (a system-scope acquire atomic) takes about 1 us: iterations per second of waiting
SPINS_PER_SECOND = 1_000_000


def symmetric_memory_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError:
        return False
    return True


def _select_backend(symm_mem, name: str, device: torch.device) -> None:
    """Make ``name`` the process's symmetric-memory backend. "cuda" is torch's default and is never set
    explicitly (setting a backend fails once a symmetric buffer exists, e.g. from an earlier layer)."""
    wanted = {"cuda": "CUDA", "nvshmem": "NVSHMEM"}[name]
    current = None
    if hasattr(symm_mem, "get_backend"):
        try:
            current = symm_mem.get_backend(device)
        except (RuntimeError, TypeError):
            current = None
    current = str(current).upper() if current else None
    if current == wanted:
        return
    if name == "cuda":
        if current in (None, "CUDA"):
            return
        raise ValueError(f"symm_mem_backend: 'cuda' requested, but this process already uses {current}")
    if not (hasattr(symm_mem, "is_nvshmem_available") and symm_mem.is_nvshmem_available()):
        raise ValueError("symm_mem_backend: 'nvshmem' requested, but this torch build has no NVSHMEM")
    try:
        symm_mem.set_backend(wanted)
    except (RuntimeError, AttributeError) as error:
        raise ValueError(
            f"symm_mem_backend: cannot switch this process to {wanted} (currently {current}); the backend is fixed "
            f"once a symmetric buffer exists: {error}"
        ) from error


class FusedDispatcher:
    """Symmetric buffers (allocated once, in the same order on every rank) and the forward of the fused path.

    Args:
        placement: expert placement over ``group``; max_tokens: the most tokens a rank sends per forward
            (buffers are sized for it); config: the full layer's MoEConfig.
        dtype / device: of activations and weights (CUDA). tiles: ``FusedTiles``; default: from the tuner for
            this layer's shape at max_tokens on this GPU (``fused_ops.fused_tiles_for``), fixed at init.
        symm_mem_backend: "cuda" or "nvshmem". spin_timeout_s: the longest a kernel waits for a peer.
    Raises:
        ValueError without CUDA / symmetric memory, on a bad option, or when a peer's buffer has no address
        this GPU can store to.
    """

    def __init__(
        self,
        placement: ExpertPlacement,
        group: dist.ProcessGroup | None,
        *,
        max_tokens: int,
        config: MoEConfig,
        dtype: torch.dtype,
        device: torch.device,
        tiles: FusedTiles | None = None,
        symm_mem_backend: str = "cuda",
        spin_timeout_s: float = DEFAULT_SPIN_TIMEOUT_S,
    ) -> None:
        device = torch.device(device)
        if not symmetric_memory_available() or device.type != "cuda":
            raise ValueError(f"backend 'fused': needs CUDA and torch.distributed._symmetric_memory, got {device}")
        if symm_mem_backend not in SYMM_MEM_BACKENDS:
            raise ValueError(f"symm_mem_backend: expected one of {SYMM_MEM_BACKENDS}, got {symm_mem_backend!r}")
        if not spin_timeout_s > 0:
            raise ValueError(f"spin_timeout_s: expected > 0, got {spin_timeout_s}")
        symm_mem = importlib.import_module("torch.distributed._symmetric_memory")
        _select_backend(symm_mem, symm_mem_backend, device)

        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.ep_size = dist.get_rank(group), dist.get_world_size(group)
        self.placement, self.config, self.max_tokens = placement, config, max_tokens
        if tiles is not None and not isinstance(tiles, FusedTiles):
            raise TypeError(f"tiles: expected a FusedTiles or None, got {type(tiles).__name__}")
        self.tiles = tiles or fused_tiles_for(config, max_tokens, dtype, torch.cuda.get_device_name(device))
        self.symm_mem_backend = symm_mem_backend
        self.max_spin = int(min(2**31 - 1, spin_timeout_s * SPINS_PER_SECOND))
        self.geom = FusedGeometry.of(
            placement, max_tokens=max_tokens, top_k=config.top_k, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, block_m=self.tiles.block_m,
        )  # fmt: skip
        bufs: dict[str, torch.Tensor] = {}
        tables: dict[str, torch.Tensor] = {}
        self.handles = {}
        for name, (shape, dt) in buffer_specs(self.geom, self.tiles, dtype).items():  # same order everywhere
            t = symm_mem.empty(shape, dtype=dt, device=device)
            t.zero_()
            try:
                handle = symm_mem.rendezvous(t, self.group)
            except TypeError:  # older signature: the group's name
                handle = symm_mem.rendezvous(t, self.group.group_name)
            ptrs = [int(p) for p in handle.buffer_ptrs]
            if len(ptrs) != self.ep_size or any(p == 0 for p in ptrs):
                raise ValueError(
                    f"symm_mem_backend {symm_mem_backend!r}: buffer {name!r} has no load/store address on some "
                    f"peer ({ptrs}); the fused path needs peers mapped into this GPU (one host, NVLink / P2P)"
                )
            bufs[name], self.handles[name] = t, handle
            tables[name] = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.state = FusedRank(self.rank, self.geom, self.tiles, bufs, tables)
        self._cut_tiles: dict[FusedTiles, FusedTiles] = {}
        self.owner = placement.owner_tensor(device)
        self.local_index = placement.local_index_tensor(device)
        torch.cuda.synchronize(device)
        # every rank zeroed its buffers before any peer writes into them; bounded by the group's timeout
        dist.barrier(group=self.group)

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        b13: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        *,
        compute: bool = True,
        events: list | None = None,
    ) -> torch.Tensor:
        """x [T, H] (T <= max_tokens), topk_ids / topk_weights [T, K]; w13 [E_local, 2I or I, H], w2
        [E_local, H, I] (+ biases): this rank's experts -> [T, H] in x.dtype. Collective, no host sync.

        For the bench: compute=False moves the same bytes but runs no GEMM (the output is then zeros);
        events: three CUDA events, recorded at the start, after dispatch (+ GEMM 1) and at the end."""
        t = x.shape[0]
        if t > self.max_tokens:
            raise ValueError(f"x: {t} tokens exceed max_tokens={self.max_tokens} the symmetric buffers were sized for")
        if x.dtype != self.state.act.dtype:
            raise TypeError(f"x: expected dtype {self.state.act.dtype} (the buffers'), got {x.dtype}")
        if events:
            events[0].record()
        st = self.state
        layout = fused_layout(topk_ids, self.owner, self.local_index, self.geom, st.scratch, st.epoch, st.layout)
        dispatch_gemm1(self.state, x, topk_weights, layout, w13.contiguous(), b13, self.config,
                       compute=compute, max_spin=self.max_spin)  # fmt: skip
        if events:
            events[1].record()
        gemm2_put(self.state, w2.contiguous(), b2, self.config, compute=compute)
        out = combine(self.state, t, layout, max_spin=self.max_spin)
        if events:
            events[2].record()
        return out

    @contextlib.contextmanager
    def using_tiles(self, tiles: FusedTiles) -> Iterator[None]:
        """Forwards inside run with ``tiles`` instead of the layer's (the benchmark's variants, e.g.
        ``dataclasses.replace(layer.fused.tiles, tma=True)``); every rank must use the same. Raises ValueError
        when ``tiles`` differs from the layer's in a field that sized the buffers (``BUFFER_FIELDS``)."""
        if not isinstance(tiles, FusedTiles):
            raise TypeError(f"tiles: expected a FusedTiles, got {type(tiles).__name__}")
        own = self.state.tiles
        differ = [f for f in BUFFER_FIELDS if getattr(tiles, f) != getattr(own, f)]
        if differ:
            raise ValueError(
                f"tiles: {differ} differ from the layer's ({[getattr(own, f) for f in differ]} -> "
                f"{[getattr(tiles, f) for f in differ]}), which sized its buffers: build a layer with these tiles"
            )
        # stages a launch had to cut (``fused_ops._launch``) are kept per requested tiles, not found again
        self.state.tiles = self._cut_tiles.get(tiles, tiles)
        try:
            yield
        finally:
            self._cut_tiles[tiles] = self.state.tiles
            self.state.tiles = own

    def check(self) -> None:
        """Raise RuntimeError when a wait of an earlier forward gave up (a lost or stalled peer). Syncs."""
        message = self.state.error()
        if message is not None:
            raise RuntimeError(f"fused EP rank {self.rank}: {message} (waited about {self.max_spin / 1e6:.3g} s)")
