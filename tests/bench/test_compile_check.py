"""bench/compile_check.py: the kernels compiled for sm_90 by this machine's Triton, no GPU (a subprocess, since the
tool needs the kernels compiled, not interpreted as the rest of the CPU suite runs them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "bench" / "compile_check.py"


def _run_ok(*args: str) -> list[str]:
    """The tool's output lines, once it has exited 0 with nothing failed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when it is unset
    done = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed"
    return lines


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_every_kernel_of_a_table_entry_for_sm90():
    # T=1: the decode kernels and the GEMM 1 that routes; T=16384: the entry (the Triton GEMM 1 with TMA, persistent,
    # then the Gluon GEMM 2 since session 15) and a variant with both Triton GEMMs persistent (persistent_tails)
    lines = _run_ok("--models", "qwen3-30b-a3b", "--num-tokens", "1", "16384", "--variants",
                    "gluon2=0,async_combine=0,persistent_tails=1")  # fmt: skip
    kernels = {line.split()[3] for line in lines if line.startswith("qwen3-30b-a3b") and line.endswith("ok")}
    assert {"_route_kernel", "_decode_gemm1_kern", "_decode_gemm2_kern", "_gemm1_kernel", "_gemm2_kernel"} <= kernels
    gemm_16384 = [line for line in lines if " 16384 " in line and "_gemm" in line]
    assert len(gemm_16384) == 4 and all(" wgmma " in line for line in gemm_16384)  # the entry and its variant
    assert any("persistent_tails=1" in line for line in gemm_16384)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_the_folded_tails_for_sm90():
    # fold_tails: both Triton GEMMs with a second dot per k step on the same weight boxes (x_sorted's and act's
    # half-height TMA boxes), persistent and unflattened; built with wgmma and no spills (the device runs Triton 3.6)
    lines = _run_ok("--models", "gpt-oss-120b", "--num-tokens", "16384", "--variants", "fold_tails=1")
    folded = [line for line in lines if "fold_tails=1" in line and "_gemm" in line]
    assert {line.split()[3] for line in folded} == {"_gemm1_kernel", "_gemm2_kernel"}
    assert all(" wgmma " in line and line.split()[7] == "0" for line in folded), folded  # no local memory


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_the_gluon_gemms_for_sm90():
    # the Gluon kernels run on no CPU: built here for sm_90, with wgmma, in the tiles the GPU tests run
    lines = _run_ok("--models", "gpt-oss-120b", "--num-tokens", "1024", "--variants",
                    "tma=1,gluon=1,block_m=128,block_n1=128,block_k1=64,num_warps1=8,num_stages1=4,block_n2=256,"
                    "block_k2=64,num_warps2=8,num_stages2=3")  # fmt: skip
    gluon = [line for line in lines if "_gluon_gemm" in line]
    assert len(gluon) == 2 and all(line.endswith("ok") and " wgmma " in line for line in gluon), gluon


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_the_ping_pong_gluon_gemms_and_gluon2_for_sm90():
    """Two MMA warpgroups taking tiles in turn (three partitions, setmaxnreg for each), in both GEMMs, and GEMM 2 alone
    in Gluon after the Triton GEMM 1; none spilling or with serialized wgmmas (the status "ok")."""
    both = ("tma=1,gluon=1,gluon2=0,async_combine=0,block_m=128,block_n1=64,block_k1=64,num_warps1=8,num_stages1=4,"
            "block_n2=128,block_k2=64,num_warps2=8,num_stages2=4,persistent1=1,persistent=1,gate_up_dot=1,pingpong1=1,"
            "pingpong2=1")  # fmt: skip
    lines = _run_ok("--models", "qwen3-30b-a3b", "--num-tokens", "16384", "--variants", both,  # a Triton GEMM 1 entry
                    "gluon=0,gluon2=1,async_combine=0,block_n2=128,num_warps2=8,persistent=1,pingpong2=1")  # fmt: skip
    variants = [line for line in lines if line.startswith("qwen3-30b-a3b") and line.split()[2] != "entry"]
    gluon = [line for line in variants if "_gluon_gemm" in line]
    assert len(gluon) == 3 and all(line.endswith("ok") and " wgmma " in line for line in gluon), gluon
    assert all(line.split()[4] == "12" for line in gluon)  # 4 + 4 MMA warps and the producer's warpgroup
    assert any("_gemm1_kernel" in line for line in variants)  # gluon2: GEMM 1 stays Triton's


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_the_gluon_gemm2_with_its_combine_in_warps_of_its_own_for_sm90():
    """async_combine: a third partition (2 warps beside the producer's, 12 warps in all, so the MMA warps keep their
    registers: 13 would have launched 16 at 128 each, too few for the [128, 256] accumulator) and a [128, 256] stage
    beside 3 ring stages; after the gathering Gluon GEMM 1 and after the Triton one."""
    combine = "pingpong2=0,block_n2=256,num_stages2=3,async_combine=1"
    lines = _run_ok("--models", "qwen3-30b-a3b", "--num-tokens", "4096", "--variants", combine,
                    f"gluon=0,gluon_gather=0,gluon2=1,{combine}")  # fmt: skip
    variants = [line for line in lines if line.startswith("qwen3-30b-a3b") and line.split()[2] != "entry"]
    gemm2 = [line for line in variants if "_gluon_gemm2" in line]
    assert len(gemm2) == 2 and all(line.endswith("ok") and " wgmma " in line for line in gemm2), gemm2
    assert all(line.split()[4] == "12" for line in gemm2)
    assert any("_gemm1_kernel" in line for line in variants)  # gluon2: GEMM 1 stays Triton's


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_a_grouped_gemm_entry_is_skipped_not_failed():
    """The H200 table runs torch's grouped GEMM at mixtral T=16384 (session 9): no Triton GEMM to build, and its torch
    ops would index with buffers that nothing wrote on the CPU (this failed as an out-of-bounds index before)."""
    lines = _run_ok("--table", "nvidia_h200", "--models", "mixtral-8x7b", "--num-tokens", "16384")
    assert any(line.endswith("skipped: torch's grouped GEMM") for line in lines)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_compiles_the_fused_expert_parallel_kernels_for_sm90():
    lines = _run_ok("--ep", "2", "--table", "nvidia_h200", "--models", "flashmoe", "--num-tokens", "128")
    kernels = {line.split()[-9] for line in lines if line.startswith("flashmoe") and line.endswith("ok")}
    assert {"_layout_count_kern", "_dispatch_gemm1_ke", "_gemm2_put_kernel", "_combine_kernel"} <= kernels, kernels


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_the_heuristic_fits_a_99_kib_gpu_by_fewer_stages():
    # sm_89 (L40S, RTX 4090): the heuristic's 128 x 128 x 64 tiles need 144 KiB at 4 stages; Triton refuses them when
    # it loads the kernel (emulated here), launch_fitting takes 3 stages (96 KiB), nothing fails
    lines = _run_ok("--table", "none", "--arch", "89", "--models", "qwen3-30b-a3b", "--num-tokens", "1024")
    gemm1 = [line.split() for line in lines if "_gemm1_kernel" in line]
    assert "refused:" in gemm1[0] and gemm1[0][5] == "4"  # 4 stages refused
    assert gemm1[-1][-1] == "ok" and gemm1[-1][5] == "3" and int(gemm1[-1][8]) <= 101376


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "unset TRITON_INTERPRET" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_flags_wgmmas_that_ptxas_serialized():
    """Triton 3.6's PTX (the device's Triton) of the Gluon GEMM 2 in version 14's flat (tile, k) loop, whose wgmmas
    ptxas serialized (C7517), and in version 15's per-tile k loop: the first is flagged, the second is not."""
    data = Path(__file__).parent / "data"
    script = (
        "import gzip, sys\n"
        f"sys.path.insert(0, {str(TOOL.parent)!r})\n"
        "import compile_check\n"
        "for path in sys.argv[1:]:\n"
        "    print(repr(compile_check._wgmma_serialized(gzip.open(path, 'rt').read(), 90)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    paths = [str(data / "gluon_gemm2_v14_serialized.ptx.gz"), str(data / "gluon_gemm2_v15.ptx.gz")]
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    serialized, fixed = done.stdout.strip().splitlines()
    # CUDA 12's ptxas (Triton 3.6) words it "warpgroup.wait is injected", CUDA 13's (Triton 3.9) "wgmma.wait_group"
    assert "C7517" in serialized and "is injected" in serialized and fixed == "''"
