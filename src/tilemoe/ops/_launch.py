"""Helpers shared by the op launchers (kept free of a module-level triton import, which not every platform has)."""

from __future__ import annotations

import functools
import os

import torch

# TILEMOE_PDL=1 launches tilemoe's kernels with programmatic dependent launch. Off by default: on an H100 it moved
# the full layer by -2% to +4% (bench/NOTES.md, "Programmatic dependent launch"), no gain worth a new code path.
PDL_ENV = "TILEMOE_PDL"


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints: the number of blocks of size b covering a (as ``triton.cdiv``)."""
    return (a + b - 1) // b


@functools.cache
def _pdl_device(index: int | None) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def pdl_enabled(device: torch.device) -> bool:
    """Whether tilemoe's kernels on ``device`` launch with programmatic dependent launch: CUDA, compute capability
    >= 9 (Hopper), a Triton that has it, and ``TILEMOE_PDL=1`` (off by default). Never in the interpreter."""
    if device.type != "cuda" or os.environ.get(PDL_ENV, "0") != "1":
        return False
    return _pdl_device(device.index)


def pdl_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch whose kernel starts with ``_pdl_prologue(PDL)``:
    ``{"PDL": True, "launch_pdl": True}`` where ``pdl_enabled``, else ``{"PDL": False}``."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
