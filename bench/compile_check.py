"""Compile the fused experts' Triton kernels for a Hopper GPU on a machine without one (CPU only, no launch).

    python3 bench/compile_check.py [--table nvidia_h100_80gb_hbm3] [--models qwen3-30b-a3b ...]
        [--num-tokens 1024 4096 16384] [--variants split_tail=1,persistent_tails=1 ...] [--arch 90]
    python3 bench/compile_check.py --ep 2 --table nvidia_h200 --models flashmoe qwen3-30b-a3b --num-tokens 1024 8192

For each (model, T): the table entry (``pick_config`` as on that GPU) and that entry with each ``--variants`` change
applied (the tuner's syntax; a change the entry cannot take is skipped). ``fused_experts`` runs its real launcher on
CPU tensors of the layer's shape, with Triton's active driver replaced by one that reports an sm_``arch`` target and
every launch turned into a compile (``warmup``): so every kernel the launchers would start on the GPU (routing, align,
GEMM 1, GEMM 2, the slot sum) goes through this machine's Triton, ptxas included. Printed per kernel: registers, spill
stores, shared memory (over the device's limit, 227 KiB on sm_90, is flagged: Triton only finds that out when it
loads the kernel on the GPU), and the compile time here. A kernel over the limit is refused here as Triton refuses
it there (``OutOfResources`` before anything runs), so the launchers' fitting (``launch_fitting``: fewer stages) runs
as on such a GPU: its refused compiles are shown as "refused", and only what still fails counts as failed.
``--arch 80 / 86 / 89`` checks GPUs before Hopper (no TMA, 163 / 99 / 99 KiB); ``--table none`` is a GPU without a
table (the heuristic). ``--ep N``: the fused expert-parallel path's kernels instead (layout, dispatch + GEMM 1,
GEMM 2 + put, combine), in the form the GPU runs (flag spins at system scope), N ranks simulated.

Why: the device machine has Triton 3.6 and CPU time is cheaper than device time. A kernel change that does not build
with the device's Triton, or that spills, is found here; install that version beside this one
(``python -m venv v36 && v36/bin/pip install torch==2.13.0 && v36/bin/pip install --no-deps triton==3.6.0``,
then ``PYTHONPATH=src v36/bin/python bench/compile_check.py``). A development tool: it measures no speed.
``COMPILE_CHECK_TRACE=1`` prints each failed compile's whole error (the table keeps its first line).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Every kernel module is imported before TRITON_INTERPRET is set below, so that @triton.jit makes JIT functions
# (the expert-parallel ones in check_expert_parallel, also before).
import tilemoe.ops._kernels._act_and_mul  # noqa: E402, F401
import tilemoe.ops._kernels._align  # noqa: E402, F401
import tilemoe.ops._kernels._combine  # noqa: E402, F401
import tilemoe.ops._kernels._decode  # noqa: E402, F401
import tilemoe.ops._kernels._fused_experts  # noqa: E402, F401
import tilemoe.ops._kernels._gluon_experts  # noqa: E402, F401
import tilemoe.ops._kernels._one_launch  # noqa: E402, F401
import tilemoe.ops._kernels._route  # noqa: E402, F401
import tilemoe.ops._kernels._router  # noqa: E402, F401
from tilemoe.config import MoEConfig  # noqa: E402
from tilemoe.ops.fused_experts import fused_experts, fused_experts_from_logits  # noqa: E402
from tilemoe.ops.route import _route_kernels, route_triton  # noqa: E402
from tilemoe.ops.router import ROUTER_KERNEL_MAX_TOKENS, router_logit_parts  # noqa: E402
from tilemoe.testing import make_routing  # noqa: E402
from tilemoe.tune_cli import DTYPES, parse_variant  # noqa: E402
from tilemoe.tuning import TABLE_DIR, KernelConfig, MoEShape, pick_config  # noqa: E402

# Shared memory per block (opt-in maximum), bytes, by compute capability: sm_80 (A100) 163 KiB, sm_86 / sm_89 99 KiB,
# sm_90 (H100 / H200) 227 KiB.
SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _CompileOnlyDriver:
    """Triton's active driver as the JIT asks it before a launch: device 0, a null stream, the target."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@dataclasses.dataclass
class Compiled:
    kernel: str
    seconds: float
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    registers: int | None = None
    spills: int | None = None
    mma: str = ""
    serialized: str = ""  # ptxas's note that it serialized the wgmmas or made them wait (_SERIALIZED_NOTE): code, words
    error: str = ""
    refused: str = ""  # over the shared memory: refused, as Triton does when it loads the kernel (why)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local-memory bytes) of the cubin's one kernel, by the cuobjdump that Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else None, int(local.group(1)) if local else None)


def _mma_kind(ptx: str) -> str:
    """The matrix instructions in the PTX: 'wgmma' (Hopper's warpgroup MMA), 'mma' (the older warp MMA) or '-'."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"


# ptxas's notes that it serialized a kernel's wgmmas (the 10 "wgmma.mma_async instructions are serialized due to ..."
# reasons: extern calls, register pressure, non-wgmma instructions touching accumulators, ...) or made them wait
# (CUDA 12's ptxas says "warpgroup.wait is injected", CUDA 13's "wgmma.wait_group is injected")
_SERIALIZED_NOTE = re.compile(
    r"\((C\d{4})\)\s*((?:Potential Performance Loss: wgmma\.mma_async instructions are serialized|"
    r"(?:warpgroup\.wait|wgmma\.wait_group) is injected).*)"
)


def _wgmma_serialized(ptx: str, arch: int) -> str:
    """ptxas's note that it serialized the kernel's wgmmas or injected a wait for them (its code and words), "" when
    there is none, or "ptxas failed: ..." when the PTX does not assemble. ptxas writes the note only with ``-v``
    (which Triton does not pass), so the PTX is assembled once more here. Why: a wait ptxas injects to read an
    accumulator undoes the one-wgmma-in-flight pipeline; the Gluon GEMMs lost 15-19% of their mainloop to it unseen
    for a session (bench/NOTES.md version 15). The ptxas is the one Triton assembles for ``arch`` with (Triton 3.9
    takes its CUDA 13 ptxas from sm_90 on, 3.6 the CUDA 12 one below sm_100)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return "ptxas failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    note = _SERIALIZED_NOTE.search(done.stdout + done.stderr)
    return f"{note.group(1)} {note.group(2).strip()}" if note else ""


class CompileRecorder:
    """Turns every JIT launch into a compile for ``target`` and records what came out; a kernel over ``shared_limit``
    bytes of shared memory is refused as Triton refuses it when it loads one (``OutOfResources``)."""

    def __init__(self, target: GPUTarget, shared_limit: int) -> None:
        self.target = target
        self.shared_limit = shared_limit
        self.records: list[Compiled] = []

    def __enter__(self) -> CompileRecorder:
        driver.set_active(_CompileOnlyDriver(self.target))
        self._run = JITFunction.run
        self._interpret = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # the launchers' Triton paths on CPU tensors; the kernels stay compiled
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            try:
                kernel = recorder._run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # a compile error: recorded (its first cause), the launcher goes on
                while exc.__cause__ is not None:
                    exc = exc.__cause__
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                if os.environ.get("COMPILE_CHECK_TRACE"):
                    print(str(exc))
                recorder.records.append(Compiled(fn.__name__, time.perf_counter() - start, error=error[:200]))
                return None
            meta = kernel.metadata
            record = Compiled(fn.__name__, time.perf_counter() - start, meta.num_warps, meta.num_stages, meta.shared,
                              *_resource_usage(kernel.asm["cubin"]), _mma_kind(kernel.asm["ptx"]))  # fmt: skip
            if record.mma == "wgmma":
                record.serialized = _wgmma_serialized(kernel.asm["ptx"], recorder.target.arch)
            recorder.records.append(record)
            if meta.shared > recorder.shared_limit:
                from triton.runtime.errors import OutOfResources

                record.refused = f"refused: shared memory {meta.shared} > {recorder.shared_limit}"
                raise OutOfResources(meta.shared, recorder.shared_limit, "shared memory")
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        JITFunction.run = self._run  # the driver stays: this machine has no other to go back to
        if self._interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self._interpret


def _empty_layer(config: MoEConfig, num_tokens: int, dtype: torch.dtype):
    """The layer's tensors on the CPU, never read (nothing runs); the routing real, for the host-side checks."""
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    x = torch.empty(num_tokens, h, dtype=dtype)
    w13 = torch.empty(e, 2 * i if config.gated else i, h, dtype=dtype)
    w2 = torch.empty(e, h, i, dtype=dtype)
    weights, ids = make_routing(num_tokens, config, generator=torch.Generator().manual_seed(0))
    b13 = torch.empty(e, w13.shape[1], dtype=dtype) if config.expert_bias else None
    b2 = torch.empty(e, h, dtype=dtype) if config.expert_bias else None
    return x, w13, w2, weights, ids, b13, b2


def table_device(table: str) -> str | None:
    """The GPU name a package table is for (its ``device`` field), as ``pick_config`` takes it; None for "none"
    (a GPU without a table: the heuristic)."""
    import json

    if table == "none":
        return None
    return json.loads((TABLE_DIR / f"{table}.json").read_text())["device"]


def table_configs(table: str, config: MoEConfig, num_tokens: int, dtype: torch.dtype) -> KernelConfig:
    """What ``pick_config`` gives on the table's GPU: its entry, else the grouped-GEMM or heuristic fallback."""
    shape = MoEShape(num_tokens, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
    return pick_config(shape, dtype, table_device(table))


def _label(cfg: KernelConfig, base: KernelConfig) -> str:
    return ",".join(f"{name}={int(value)}" for name, value in cfg.changes(base).items()) or "entry"


def _print_records(model: str, num_tokens: int, label: str, records: list[Compiled]) -> int:
    """One line per compiled kernel; returns how many failed (a compile error, or a launch that fit nowhere)."""
    failures = 0
    for r in records:
        status = r.refused or ("FAIL " + r.error if r.error else "spills" if r.spills else "ok")
        if r.serialized and not r.error:
            status += f" (wgmma serialized: {r.serialized[:60]})"
        failures += status.startswith("FAIL")
        regs = "" if r.registers is None else r.registers
        local = "" if r.spills is None else r.spills
        print(f"{model:<18} {num_tokens:>6} {label:<34.34} {r.kernel:<18.18} {r.num_warps:>5} {r.num_stages:>3} "
              f"{regs:>4} {local:>5} {r.shared:>7} {r.mma:>5} {r.seconds:>5.1f}  {status}")  # fmt: skip
    return failures


def _model_config(name: str) -> MoEConfig:
    if name == "flashmoe":  # the FlashMoE paper's layer, as the expert-parallel bench runs it
        return MoEConfig(num_experts=32, top_k=2, hidden_size=2048, intermediate_size=2048, name="flashmoe")
    return MoEConfig.from_pretrained(name)


def check_single_gpu(args, target: GPUTarget, dtype: torch.dtype) -> int:
    """The one-GPU layer: routing, then fused_experts with the table entry and each variant of it."""
    variants = [parse_variant(v) for v in args.variants]
    failures = 0
    for model in args.models:
        config = _model_config(model)
        for num_tokens in args.num_tokens:
            entry = table_configs(args.table, config, num_tokens, dtype)
            configs = [entry]
            for changes in variants:
                try:
                    configs.append(dataclasses.replace(entry, **changes))
                except ValueError as exc:
                    print(f"{model:<18} {num_tokens:>6} {'+' + ','.join(changes):<34} skipped: {exc}")
            for index, cfg in enumerate(dict.fromkeys(configs)):
                if cfg.grouped_mm:  # cuBLAS / CUTLASS GEMMs, whose torch ops would read buffers nothing wrote here
                    print(f"{model:<18} {num_tokens:>6} {_label(cfg, entry):<34.34} skipped: torch's grouped GEMM")
                    continue
                x, w13, w2, weights, ids, b13, b2 = _empty_layer(config, num_tokens, dtype)
                with CompileRecorder(target, SHARED_BYTES[target.arch]) as rec:
                    try:
                        if index == 0:  # the routing kernels, once per point: on logits, and on the router's parts
                            bias = torch.empty(config.num_experts) if config.score_correction_bias else None
                            route_triton(torch.empty(num_tokens, config.num_experts), config, bias)
                            if dtype != torch.float32 and num_tokens > ROUTER_KERNEL_MAX_TOKENS:
                                router = torch.empty(config.num_experts, config.hidden_size, dtype=dtype)
                                _route_kernels(router_logit_parts(x, router), config, bias)
                        fused_experts(x, w13, w2, weights, ids, config=config, b13=b13, b2=b2, kernel_config=cfg,
                                      deterministic=args.deterministic)  # fmt: skip
                        if cfg.decode:  # at T = 1 the decode GEMM 1 routes its slot's token itself
                            logits = torch.empty(num_tokens, config.num_experts)
                            fused_experts_from_logits(x, w13, w2, logits, config=config, b13=b13, b2=b2,
                                                      kernel_config=cfg)  # fmt: skip
                    except RuntimeError as exc:  # a launch that does not fit even at 1 stage
                        rec.records.append(Compiled("(launch)", 0.0, error=str(exc).splitlines()[0][:200]))
                failures += _print_records(model, num_tokens, _label(cfg, entry), rec.records)
    return failures


def check_expert_parallel(args, target: GPUTarget, dtype: torch.dtype) -> int:
    """The fused expert-parallel path (``backend="fused"``): its kernels as the GPU runs them (spinning on flags,
    system scope), with the tiles ``fused_tiles_for`` picks from the table at T per rank, ranks simulated in one
    process (``SimulatedFusedEP``; nothing runs, so nothing waits)."""
    import tilemoe.distributed.fused_kernels  # noqa: F401  (JIT functions: imported before TRITON_INTERPRET is set)
    from tilemoe.distributed import fused_ops
    from tilemoe.distributed.fused import simulate_fused_forward
    from tilemoe.distributed.placement import ExpertPlacement

    device_name = table_device(args.table)
    interpreting, fused_ops.interpreting = fused_ops.interpreting, lambda: False  # the GPU's kernels: SPIN, SYS
    failures = 0
    try:
        for model in args.models:
            config = _model_config(model)
            placement = ExpertPlacement.contiguous(config.num_experts, args.ep)
            for num_tokens in args.num_tokens:
                tiles = fused_ops.fused_tiles_for(config, num_tokens, dtype, device_name)
                shards = [_empty_layer(config, num_tokens, dtype) for _ in range(args.ep)]
                experts = [placement.experts_of(r) for r in range(args.ep)]
                with CompileRecorder(target, SHARED_BYTES[target.arch]) as rec:
                    simulate_fused_forward(
                        [s[0] for s in shards], [s[3] for s in shards], [s[4] for s in shards],
                        [s[1][e] for s, e in zip(shards, experts)], [s[2][e] for s, e in zip(shards, experts)],
                        placement, config, tiles=tiles,
                    )  # fmt: skip
                label = (
                    f"ep{args.ep} bm{tiles.block_m} {tiles.block_n1}x{tiles.block_k1} {tiles.block_n2}x{tiles.block_k2}"
                )
                failures += _print_records(model, num_tokens, label + (" tma" if tiles.tma else ""), rec.records)
    finally:
        fused_ops.interpreting = interpreting
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="nvidia_h100_80gb_hbm3", help='a package table\'s name, or "none"')
    parser.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b",
                                                        "mixtral-8x7b"], help="presets, or flashmoe")  # fmt: skip
    parser.add_argument("--num-tokens", nargs="+", type=int, default=[1024, 4096, 16384], help="per rank with --ep")
    parser.add_argument("--variants", nargs="*", default=[], metavar="FIELD=VALUE[,...]")
    parser.add_argument(
        "--ep",
        type=int,
        default=0,
        metavar="N",
        help="the fused expert-parallel path over N simulated ranks instead of the one-GPU layer",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_BYTES), default=90)
    parser.add_argument("--deterministic", action="store_true", help="the per-slot combine instead of the atomic one")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    target = GPUTarget("cuda", args.arch, 32)
    import tilemoe.ops._fused_experts_launch as launch

    launch.GLUON_COMPILE_ONLY = args.arch == 90  # the Gluon kernels are Hopper's
    if args.arch < 90:  # before Hopper the launchers read through pointers (no TMA), as they decide on such a GPU
        launch._tma_rows_ok = lambda *args, **kwargs: False
    print(f"triton {triton.__version__}, torch {torch.__version__}, target cuda sm_{args.arch}, table {args.table}")
    print(f"{'model':<18} {'T':>6} {'config':<34} {'kernel':<18} {'warps':>5} {'stg':>3} {'regs':>4} "
          f"{'local':>5} {'shared':>7} {'mma':>5} {'s':>5}  status")  # fmt: skip
    if args.ep:
        failures = check_expert_parallel(args, target, dtype)
    else:
        failures = check_single_gpu(args, target, dtype)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
