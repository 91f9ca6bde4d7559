"""GEMM 2's atomic adds against an L2 persisting window over the output, timed in turn (a development probe).

    python3 bench/l2_window_probe.py --points qwen3-30b-a3b:16384 gpt-oss-120b:16384 [--persist-mb 30] [--rounds 5]

Where the output [T, H] exceeds the L2 (qwen3-30b-a3b T=16384: 67 MB) a token's K adds come from K experts' tiles
spread over the whole GEMM 2, so most of them likely miss and read / write their sectors in DRAM (bench/NOTES.md,
version 23). The driver's access policy window (cuStreamSetAttribute, CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW) marks
a share ``hitRatio`` of an address range as persisting in a set-aside part of the L2 (cuCtxSetLimit,
CU_LIMIT_PERSISTING_L2_CACHE_SIZE), so those lines stay while weights and activations stream past. This probe sets
the window on the output of ``fused_experts`` (the caching allocator hands the same block back each call; the probe
checks that it did) and times the point's table entry with and without it, in turn; the layer's output is compared.
Random routing, bf16. The numbers that back claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics

import torch
from ncu_probe import point_inputs  # bench/, beside this file

from tilemoe.ops.fused_experts import fused_experts

_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06  # CUlimit
_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1  # CUstreamAttrID
_PROPERTY_NORMAL, _PROPERTY_STREAMING, _PROPERTY_PERSISTING = 0, 1, 2  # CUaccessProperty


class _AccessPolicyWindow(ctypes.Structure):
    _fields_ = [
        ("base_ptr", ctypes.c_void_p),
        ("num_bytes", ctypes.c_size_t),
        ("hitRatio", ctypes.c_float),
        ("hitProp", ctypes.c_int),
        ("missProp", ctypes.c_int),
    ]


class _StreamAttrValue(ctypes.Union):  # CUlaunchAttributeValue: 64 bytes, the window first
    _fields_ = [("window", _AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuStreamSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_StreamAttrValue)]
    lib.cuCtxSetLimit.argtypes = [ctypes.c_int, ctypes.c_size_t]
    lib.cuCtxGetLimit.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
    return lib


def set_aside(lib, num_bytes: int) -> int:
    """Set aside ``num_bytes`` of the L2 for persisting lines (0: none), its lines reset; returns the bytes granted."""
    torch.cuda.synchronize()
    _check(lib.cuCtxResetPersistingL2Cache(), "reset persisting lines")
    _check(lib.cuCtxSetLimit(_LIMIT_PERSISTING_L2_CACHE_SIZE, num_bytes), "persisting limit")
    granted = ctypes.c_size_t()
    _check(lib.cuCtxGetLimit(ctypes.byref(granted), _LIMIT_PERSISTING_L2_CACHE_SIZE), "persisting limit")
    return granted.value


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: CUresult {rc}")


def set_window(lib, stream: torch.cuda.Stream, base: int, num_bytes: int, hit_ratio: float) -> None:
    """The stream's access policy window: ``num_bytes`` from ``base``, a share ``hit_ratio`` persisting (0: off)."""
    value = _StreamAttrValue()
    value.window = _AccessPolicyWindow(base, num_bytes, hit_ratio, _PROPERTY_PERSISTING, _PROPERTY_NORMAL)
    _check(lib.cuStreamSetAttribute(stream.cuda_stream, _STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, value), "window")


def probe_point(lib, stream, point: str, persist: int, granted: int, rounds: int, calls: int) -> str:
    """One point's table entry timed without and with the window over its output, in turn; the line to print."""
    p = point_inputs(point)
    name, t, x = p.name, p.num_tokens, p.x

    def run():
        return fused_experts(x, p.w13, p.w2, p.topk_weights, p.topk_ids, config=p.config, b13=p.b13, b2=p.b2,
                             kernel_config=p.entry)  # fmt: skip

    reference = run().float()
    torch.cuda.synchronize()
    base = run().data_ptr()  # freed below: each later call's output takes this block again
    out_bytes = t * p.config.hidden_size * x.element_size()
    hit_ratio = min(1.0, granted / out_bytes)
    arms = {"none": 0, "window": out_bytes}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    moved = 0
    worst = 0.0
    for _ in range(rounds):
        for arm, num_bytes in arms.items():
            set_aside(lib, persist if num_bytes else 0)  # "none": the whole L2 normal, no persisting lines left
            set_window(lib, stream, base, num_bytes, hit_ratio if num_bytes else 0.0)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                out = run()
                moved += out.data_ptr() != base
                del out
            end.record()
            torch.cuda.synchronize()
            times[arm].append(start.elapsed_time(end) * 1e3 / calls)
            out = run()
            worst = max(worst, (out.float() - reference).abs().max().item())
            del out
    set_window(lib, stream, base, 0, 0.0)
    set_aside(lib, 0)
    none, window = statistics.median(times["none"]), statistics.median(times["window"])
    return (
        f"{name} T={t}: out {out_bytes / 2**20:.1f} MiB, hitRatio {hit_ratio:.2f}: none {none:.1f} us, window "
        f"{window:.1f} us ({window / none:.3f}x); output moved off the window in {moved} calls; max |out - first| "
        f"{worst:.3g}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["qwen3-30b-a3b:16384"], help="MODEL:T")
    parser.add_argument("--persist-mb", type=float, default=30.0, help="L2 set aside for persisting lines")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls a round and arm")
    args = parser.parse_args(argv)
    lib = _driver()
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the primary context current on this thread for the driver calls
    persist = int(args.persist_mb * 2**20)
    granted = set_aside(lib, persist)
    print(f"# {torch.cuda.get_device_name()}, L2 set aside for persisting lines: {granted / 2**20:.1f} MiB")
    stream = torch.cuda.current_stream()
    for point in args.points:
        print(probe_point(lib, stream, point, persist, granted, args.rounds, args.calls), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
