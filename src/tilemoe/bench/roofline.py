"""Peak rates of this device, measured once and cached: copy bandwidth and dense matmul rate.

Copy bandwidth counts read + write bytes of a large ``dst.copy_(src)``; the matmul rate is a square matmul in
the bench's dtype (bf16 on a GPU run: the H100's tensor-core rate). Both are what this device achieves here,
not datasheet numbers. Cached per (device name, dtype) in ``$TILEMOE_CACHE_DIR/roofline.json`` (default
``~/.cache/tilemoe``); delete the file to measure again. On CPU the measurement is small and quick (< 1 s).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Roofline:
    device_name: str
    dtype: str
    copy_gbps: float  # GB/s, read + write bytes
    matmul_tflops: float  # TFLOP/s, dense matmul in ``dtype``

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy_gbps * 1e9

    @property
    def matmul_flops_per_s(self) -> float:
        return self.matmul_tflops * 1e12


def cache_dir() -> Path:
    return Path(os.environ.get("TILEMOE_CACHE_DIR") or Path.home() / ".cache" / "tilemoe")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _copy_seconds(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), device, repeats)


def measure_roofline(device: torch.device, dtype: torch.dtype) -> Roofline:
    """Measure copy bandwidth and matmul rate on ``device`` now (no cache)."""
    on_gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if on_gpu else (64 << 20)  # 1 GiB: far past L2 (50 MB on H100)
    repeats = 10 if on_gpu else 3
    copy_s = _copy_seconds(device, copy_bytes, repeats)
    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_s = _best_seconds(lambda: a @ b, device, repeats)
    return Roofline(
        device_name=device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        copy_gbps=2 * copy_bytes / copy_s / 1e9,
        matmul_tflops=2 * n**3 / mm_s / 1e12,
    )


def get_roofline(device: torch.device, dtype: torch.dtype, *, refresh: bool = False) -> Roofline:
    """The cached roofline of (device name, dtype), measuring and caching it on first use."""
    path = cache_dir() / "roofline.json"
    key = f"{device_name(device)}|{str(dtype).replace('torch.', '')}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not refresh and key in cache:
        try:
            return Roofline(**cache[key])
        except TypeError:
            pass
    roof = measure_roofline(device, dtype)
    cache[key] = asdict(roof)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:  # a read-only home must not stop the bench
        pass
    return roof
