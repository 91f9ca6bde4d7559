"""Helpers shared by the op launchers (kept free of a module-level triton import, which not every platform has)."""

from __future__ import annotations

import contextlib
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


# num_stages that fit, found by ``launch_fitting`` on a GPU with less shared memory per block than a config asks for;
# keyed by the kernel, the device and the launch's constants (its upper-case keywords, warps and stages asked; the
# element size follows from FP32_PRECISE, which every GEMM kernel takes).
_FITTED_STAGES: dict[tuple, int] = {}


# Open ``recording_stages`` records: each successful ``launch_fitting`` with ``record_as`` writes its stages there.
_STAGE_RECORDS: list[dict[str, int]] = []


@contextlib.contextmanager
def recording_stages():
    """Yields a dict that collects, for the ``launch_fitting`` calls made inside the block with ``record_as`` set,
    {record_as: stages launched} (the fewest when a field launches more than once). The tuner reads it to write a
    config as it ran when Triton refused its stage count (``tilemoe tune``, bench/NOTES.md version 13)."""
    record: dict[str, int] = {}
    _STAGE_RECORDS.append(record)
    try:
        yield record
    finally:
        _STAGE_RECORDS.remove(record)


def _fit_key(kernel, device: torch.device, kwargs: dict) -> tuple:
    constants = tuple((k, v) for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages"))
    return (kernel, device.index, constants)


def _out_of_shared_memory(error: Exception) -> bool:
    from triton.runtime.errors import OutOfResources

    return isinstance(error, OutOfResources) and error.name == "shared memory"


def launch_fitting(
    kernel,
    grid: tuple,
    device: torch.device,
    *,
    record_as: str | None = None,
    stage_arg: str = "num_stages",
    min_stages: int = 1,
    **kwargs,
) -> int:
    """``kernel[grid](**kwargs)``, with ``num_stages`` lowered one at a time while Triton refuses the kernel for its
    shared memory (``OutOfResources``, raised when the compiled kernel is loaded, before anything is enqueued, so a
    CUDA graph being captured is untouched); the stages that fit are remembered for the next launch with the same
    constants. Returns the stages it launched with. Why: the tuned tables and the heuristic's large tiles are sized
    for Hopper's 227 KiB per block; an sm_86 / sm_89 GPU (A10, L4, L40S, RTX 4090) has 99 KiB, where the heuristic's
    128 x 128 x 64 tiles need 120-144 KiB at their 3-4 stages (``bench/compile_check.py --table none --arch 89``,
    bench/results/session10-compile-check.md). Raises RuntimeError naming the kernel and its tiles when ``min_stages``
    do not fit either. ``record_as``: the KernelConfig field of these stages (e.g. "num_stages1"), for
    ``recording_stages``. ``stage_arg``: the keyword that holds the stage count (a Gluon kernel's own ring depth,
    ``NUM_STAGES``), lowered no further than ``min_stages``."""
    if _FITTED_STAGES and device.type == "cuda":
        kwargs[stage_arg] = _FITTED_STAGES.get(_fit_key(kernel, device, kwargs), kwargs[stage_arg])
    key = None
    while True:
        try:
            kernel[grid](**kwargs)
        except Exception as error:
            if not _out_of_shared_memory(error):
                raise
            if key is None:  # the first refusal: the stages asked, as the next launch will ask them
                key, first_error = _fit_key(kernel, device, kwargs), error
            if kwargs[stage_arg] <= min_stages:
                break
            kwargs[stage_arg] -= 1
            continue
        stages = kwargs[stage_arg]
        if key is not None:
            _FITTED_STAGES[key] = stages
        if record_as is not None:
            for record in _STAGE_RECORDS:
                record[record_as] = min(record.get(record_as, stages), stages)
        return stages
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    tiles = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK"))
    raise RuntimeError(
        f"{name}: needs more shared memory than this GPU has, even at {min_stages} stage{'s' * (min_stages > 1)} "
        f"({tiles}, "
        f"num_warps={kwargs.get('num_warps')}). Triton: {first_error} Give fused_experts a kernel_config with smaller "
        "tiles, or run `tilemoe tune` on this GPU."
    ) from first_error
