"""The launchers behind ``tilemoe.ops.fused_experts``: align, then the expert kernels in the form the ``KernelConfig``
picks (the two tiled GEMMs, both in one persistent launch, the decode kernels, or torch's grouped GEMM), with the
device facts and TMA descriptors they need. ``fused_experts``' custom ops call ``_launch``; nothing here checks its
arguments (``fused_experts._check`` did).

Dimension letters and index arrays as in ``tilemoe.ops._kernels._fused_experts``.
"""

from __future__ import annotations

import functools

import torch

from tilemoe.ops._launch import cdiv, launch_fitting, pdl_options
from tilemoe.ops.act_and_mul import launch_act_and_mul
from tilemoe.ops.align import moe_align
from tilemoe.ops.combine import sum_slots
from tilemoe.ops.grouped_mm import grouped_matmul, grouped_mm_available
from tilemoe.tuning import KernelConfig


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _num_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The decode GEMM 2 runs one program per (slot, column block), each writing its slot's weighted row, and the K rows
# are summed after (sum_slots), rather than one program per (token, column block) walking its K picks: per slot won
# every point timed on an H100 (bench/decode_probe.py; fused_experts, CUDA-graph replays): qwen3-30b-a3b T=1 34.7 vs
# 46.7-49.8 us for the per-token tiles, deepseek-v2-lite T=1 44.9 vs 56.7, gpt-oss-120b T=1 82.6 vs 102.3, qwen3
# T=2 / 4 / 8 60.6 / 102.2 / 166.0 vs 70.7 / 106.2 / 172.9. False (probes, tests) runs the per-token form.
DECODE_GEMM2_PER_SLOT = True

# Programs of a persistent launch in the interpreter: few, so that each walks several tiles in the tests.
INTERPRETER_PROGRAMS = 3


def _persistent_grid(device: torch.device, max_tiles: int) -> int:
    programs = _num_sms(device.index) if device.type == "cuda" else INTERPRETER_PROGRAMS
    return max(1, min(programs, max_tiles))


def _grid(device: torch.device, tiles: int, persistent: bool) -> tuple[int]:
    """A GEMM's grid: one program per tile, or ``_persistent_grid``'s programs walking them."""
    return (_persistent_grid(device, tiles) if persistent else tiles,)


def _combine_output(x: torch.Tensor, num_slots: int, atomic: bool) -> torch.Tensor:
    """GEMM 2's output: the [T, H] zeros the atomic combine adds each slot's row into, else [S, H] per-slot rows
    (every one written; summed over K afterwards)."""
    rows = x.shape[0] if atomic else num_slots
    return (torch.zeros if atomic else torch.empty)((rows, x.shape[1]), dtype=x.dtype, device=x.device)


def _tma_rows_ok(device: torch.device, row_elems: int, elem_size: int, block_k: int) -> bool:
    """Whether TMA can read contiguous rows of ``row_elems`` elements in [*, block_k] boxes on ``device``: Hopper or
    later (or the interpreter), 16-byte aligned rows, a box row of at most 128 bytes."""
    if device.type == "cuda" and _capability_major(device.index) < 9:
        return False
    return (row_elems * elem_size) % 16 == 0 and block_k * elem_size <= 128


def _tma_readable(w: torch.Tensor, block_k: int) -> bool:
    """Whether TMA can read ``w`` in boxes of ``block_k`` columns: contiguous, 16-byte aligned, ``_tma_rows_ok``."""
    if not w.is_contiguous() or w.data_ptr() % 16:
        return False
    return _tma_rows_ok(w.device, w.shape[-1], w.element_size(), block_k)


def _tma_descriptor(w: torch.Tensor, block_n: int, block_k: int):
    """TMA descriptor over w [..., K] (weights [E, N, K], or GEMM 1's output [CAP, I]) viewed as [-1, K] with
    [block_n, block_k] boxes, or None when TMA cannot read it: not contiguous, rows not 16-byte aligned, a box row
    over 128 bytes, or a GPU before Hopper."""
    if not _tma_readable(w, block_k):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [block_n, block_k])


def _gate_up_descriptor(w13: torch.Tensor, block_n: int, block_k: int):
    """TMA descriptor over gated w13 [E, 2I, H] viewed as [2E, I, H] with [2, block_n, block_k] boxes: the gate rows
    and the matching up rows of one column block in one load (zero-filled past I and H); None where TMA cannot read
    it (as ``_tma_descriptor``)."""
    if not _tma_readable(w13, block_k):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_experts, rows, hidden = w13.shape
    return TensorDescriptor.from_tensor(w13.view(2 * num_experts, rows // 2, hidden), [2, block_n, block_k])


# GEMM 1's sorted copy of x token by token (each x row read once, ``_sorted_rows_by_token_kernel``) from this many
# bytes of x (T * H * element size) on; below, row by row. H100, bench/sorted_copy_probe.py (CUDA graphs in turn,
# session 25): gpt-oss-120b T=16384 (x 94 MB, more than the L2) 278.1 -> 208.2 us, mixtral-8x7b T=4096 (32 MiB)
# 53.1 -> 52.4; smaller x (the row-by-row copy's repeat reads come from the L2) not timed.
SORTED_ROWS_BY_TOKEN_MIN_BYTES: int | None = 32 << 20


def _sorted_rows(x: torch.Tensor, align, capacity: int, top_k: int) -> torch.Tensor:
    """x in padded sorted order [CAP, H]: row r holds x[sorted_ids[r] // K], padding rows zeros; rows at or past
    num_padded are not written (no GEMM reads them). Row by row, or token by token where x has at least
    ``SORTED_ROWS_BY_TOKEN_MIN_BYTES``."""
    from tilemoe.ops._kernels._fused_experts import (
        _slot_rows_kernel,
        _sorted_rows_by_token_kernel,
        _sorted_rows_kernel,
    )

    num_tokens, hidden = x.shape
    num_slots = num_tokens * top_k
    out = torch.empty((capacity, hidden), dtype=x.dtype, device=x.device)
    # both forms' arguments: x, the copy, the alignment's rows
    copy_args = dict(
        x_ptr=x, stride_xt=x.stride(0), stride_xh=x.stride(1), out_ptr=out, stride_or=out.stride(0),
        stride_oh=out.stride(1), sorted_ids_ptr=align.sorted_ids, num_padded_ptr=align.num_padded,
        num_slots=num_slots, top_k=top_k, hidden=hidden, BLOCK_R=16,
        BLOCK_H=min(512, max(16, 1 << (hidden - 1).bit_length())), num_warps=4,
    )  # fmt: skip
    min_bytes = SORTED_ROWS_BY_TOKEN_MIN_BYTES
    if min_bytes is not None and x.numel() * x.element_size() >= min_bytes and capacity:
        slot_rows = torch.empty(num_slots, dtype=torch.int32, device=x.device)
        _slot_rows_kernel[(cdiv(capacity, 1024),)](
            **pdl_options(x.device),
            sorted_ids_ptr=align.sorted_ids,
            num_padded_ptr=align.num_padded,
            slot_rows_ptr=slot_rows,
            num_slots=num_slots,
            BLOCK_R=1024,
            num_warps=4,
        )
        token_programs = cdiv(num_tokens, 16)
        _sorted_rows_by_token_kernel[(token_programs + cdiv(capacity, copy_args["BLOCK_R"]),)](
            **pdl_options(x.device),
            **copy_args,
            slot_rows_ptr=slot_rows,
            num_tokens=num_tokens,
            token_programs=token_programs,
            BLOCK_T=16,
        )
        return out
    _sorted_rows_kernel[(cdiv(capacity, copy_args["BLOCK_R"]),)](**pdl_options(x.device), **copy_args)
    return out


def _device_of(x: torch.Tensor) -> str | None:
    return _device_name(x.device.index) if x.is_cuda else None


def _launch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: int,
    gated: bool,
    weights_on_input: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    cfg: KernelConfig,
    deterministic: bool,
) -> torch.Tensor:
    from tilemoe.ops._kernels._fused_experts import _gemm1_kernel

    num_tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_tokens == 0:
        return x.new_empty((0, hidden))
    if cfg.decode:
        return _launch_decode(
            x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input, swiglu_alpha,
            swiglu_limit, cfg,
        )  # fmt: skip
    if cfg.grouped_mm and grouped_mm_available(x.device.type, x.dtype):
        return _launch_grouped_mm(
            x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input, swiglu_alpha,
            swiglu_limit, cfg,
        )  # fmt: skip
    atomic = not deterministic and top_k > 1 and not cfg.per_slot_combine
    # the atomic combine's output, cleared by the align's programs (``align_clears_out``), else below
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device) if atomic and cfg.align_clears_out else None
    align = moe_align(topk_ids, num_experts, cfg.block_m, zeros=out)
    capacity = align.sorted_ids.numel()
    num_blocks_m = capacity // cfg.block_m
    weights_flat = topk_weights.reshape(-1)
    act = torch.empty((capacity, inter), dtype=x.dtype, device=x.device)
    gluon = (cfg.gluon_gemm1 or cfg.gluon_gemm2) and _gluon_ready(x, w13, w2, cfg)
    gemm2_args = (x, w2, b2, weights_flat, top_k, align, act, weights_on_input, atomic, cfg, gluon and cfg.gluon_gemm2)
    if gluon and cfg.gluon_gemm1:  # before the Triton kernels' descriptors and x copy
        _launch_gluon_gemm1(
            x, w13, w2, b13, weights_flat, top_k, align, act, activation, gated, weights_on_input, swiglu_alpha,
            swiglu_limit, cfg,
        )  # fmt: skip
        if out is None:
            out = _combine_output(x, num_slots, atomic)
        return _gemm2_and_combine(out, *gemm2_args)
    b13_arg = b13 if b13 is not None else w13  # never read when HAS_BIAS is False
    w13_desc = None
    gate_up_dot = cfg.gate_up_dot and gated
    if gate_up_dot:
        w13_desc = _gate_up_descriptor(w13, cfg.block_n1, cfg.block_k1)
        gate_up_dot = w13_desc is not None
    if w13_desc is None and cfg.tma:
        w13_desc = _tma_descriptor(w13, cfg.block_n1, cfg.block_k1)
    # a tile height picked per tile (split, swapped tails): not in a flattened persistent loop, which holds one shape
    heights_vary1 = not cfg.persistent1 or cfg.persistent_tails
    split_tail1 = cfg.split_tail and heights_vary1
    # GEMM 1's input: x gathered by token, or x_sorted through TMA boxes (full, and half for split tails)
    x_arg = x_tail_arg = x
    if cfg.sorted_x and _tma_rows_ok(x.device, hidden, x.element_size(), cfg.block_k1):
        x_sorted = _sorted_rows(x, align, capacity, top_k)
        x_arg = x_tail_arg = _tma_descriptor(x_sorted, cfg.block_m, cfg.block_k1)
        if split_tail1 or cfg.fold_tails:  # half-height boxes: split tails, and the folded tails' rows
            x_tail_arg = _tma_descriptor(x_sorted, cfg.block_m // 2, cfg.block_k1)
    # GEMM 1's arguments, the same in the two-launch and the one-launch kernel
    gemm1_args = dict(
        x_ptr=x_arg,
        x_tail_ptr=x_tail_arg,
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        w_ptr=w13 if w13_desc is None else w13_desc,
        stride_we=w13.stride(0),
        stride_wn=w13.stride(1),
        stride_wh=w13.stride(2),
        b_ptr=b13_arg,
        stride_be=b13_arg.stride(0),
        stride_bn=b13_arg.stride(1),
        topk_weights_ptr=weights_flat,
        act_ptr=act,
        stride_am=act.stride(0),
        stride_ai=act.stride(1),
        sorted_ids_ptr=align.sorted_ids,
        expert_ids_ptr=align.expert_ids,
        expert_starts_ptr=align.expert_starts,
        num_padded_ptr=align.num_padded,
        num_slots=num_slots,
        top_k=top_k,
        hidden=hidden,
        inter=inter,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        ACTIVATION=activation,
        GATED=gated,
        HAS_BIAS=b13 is not None,
        WEIGHTS_ON_INPUT=weights_on_input,
        FP32_PRECISE=x.dtype == torch.float32,
        W_TMA=w13_desc is not None,
        A_TMA=x_arg is not x,
        GATE_UP_DOT=gate_up_dot,
        EVEN_K=hidden % cfg.block_k1 == 0,
        EVEN_N=inter % cfg.block_n1 == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n1,
        BLOCK_K=cfg.block_k1,
        GROUP_M=cfg.group_m1,
        EXPERT_GROUPS=cfg.expert_groups,
        SPLIT_TAIL=split_tail1,
    )
    if cfg.one_launch:
        out, _ = _launch_one(gemm1_args, x, w2, b2, weights_flat, act, align, atomic, cfg)
        return out if atomic else sum_slots(out, top_k)
    tiles1 = num_blocks_m * cdiv(inter, cfg.block_n1)
    # or cleared by GEMM 1's programs (a share each), or by a fill after it
    gemm1_zeros = None
    if atomic and cfg.gemm1_clears_out:
        out = gemm1_zeros = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    launch_fitting(
        _gemm1_kernel,
        _grid(x.device, tiles1, cfg.persistent1),
        x.device,
        record_as="num_stages1",
        **pdl_options(x.device),
        **gemm1_args,
        FOLD_TAILS=cfg.fold_tails,
        SWAP_TAILS=cfg.swap_tails1 and heights_vary1,
        num_blocks_m=num_blocks_m,
        PERSISTENT=cfg.persistent1,
        zero_ptr=gemm1_zeros,
        zero_numel=0 if gemm1_zeros is None else gemm1_zeros.numel(),
        ZERO_OUT=gemm1_zeros is not None,
        num_warps=cfg.num_warps1,
        num_stages=cfg.num_stages1,
    )
    if out is None:
        out = _combine_output(x, num_slots, atomic)
    return _gemm2_and_combine(out, *gemm2_args)


def _gemm2_and_combine(
    out, x, w2, b2, weights_flat, top_k: int, align, act, weights_on_input, atomic: bool, cfg: KernelConfig,
    gluon: bool,
) -> torch.Tensor:  # fmt: skip
    """GEMM 2 (the Gluon kernel when ``gluon``, else the Triton one) into the combine's output ``out``, then the
    layer's output: ``out`` itself when the combine is atomic, else its per-slot rows summed over K."""
    launch = _launch_gluon_gemm2 if gluon else _launch_triton_gemm2
    launch(x, w2, b2, weights_flat, top_k, align, act, out, weights_on_input, atomic, cfg)
    return out if atomic else sum_slots(out, top_k)


def _launch_triton_gemm2(
    x, w2, b2, weights_flat, top_k: int, align, act, out, weights_on_input, atomic: bool, cfg: KernelConfig
) -> None:
    """The Triton GEMM 2 (``_gemm2_kernel``): act (GEMM 1's output) into the combine's output ``out``, added per token
    (atomic) or stored per slot."""
    from tilemoe.ops._kernels._fused_experts import _gemm2_kernel

    b2_arg = b2 if b2 is not None else w2
    w2_desc = _tma_descriptor(w2, cfg.block_n2, cfg.block_k2) if cfg.tma else None
    act_desc = _tma_descriptor(act, cfg.block_m, cfg.block_k2) if cfg.tma else None
    split_tail2 = cfg.split_tail and (not cfg.persistent or cfg.persistent_tails)
    # the half tiles' boxes; TMA reads act through both descriptors or neither (same tensor, same layout test)
    act_arg = act if act_desc is None else act_desc
    act_tail_arg = act_arg
    if act_desc is not None and (split_tail2 or cfg.fold_tails2):
        act_tail_arg = _tma_descriptor(act, cfg.block_m // 2, cfg.block_k2)
    num_blocks_m = align.sorted_ids.numel() // cfg.block_m
    tiles2 = num_blocks_m * cdiv(x.shape[1], cfg.block_n2)
    launch_fitting(
        _gemm2_kernel,
        _grid(x.device, tiles2, cfg.persistent),
        x.device,
        record_as="num_stages2",
        **pdl_options(x.device),
        act_ptr=act_arg,
        act_tail_ptr=act_tail_arg,
        stride_am=act.stride(0),
        stride_ai=act.stride(1),
        w_ptr=w2 if w2_desc is None else w2_desc,
        stride_we=w2.stride(0),
        stride_wh=w2.stride(1),
        stride_wi=w2.stride(2),
        b_ptr=b2_arg,
        stride_be=b2_arg.stride(0),
        stride_bh=b2_arg.stride(1),
        topk_weights_ptr=weights_flat,
        out_ptr=out,
        stride_om=out.stride(0),
        stride_oh=out.stride(1),
        sorted_ids_ptr=align.sorted_ids,
        expert_ids_ptr=align.expert_ids,
        expert_starts_ptr=align.expert_starts,
        num_padded_ptr=align.num_padded,
        num_slots=x.shape[0] * top_k,
        top_k=top_k,
        hidden=x.shape[1],
        inter=w2.shape[2],
        num_blocks_m=num_blocks_m,
        HAS_BIAS=b2 is not None,
        WEIGHTS_ON_INPUT=weights_on_input,
        ATOMIC=atomic,
        FP32_PRECISE=x.dtype == torch.float32,
        W_TMA=w2_desc is not None,
        A_TMA=act_desc is not None,
        PERSISTENT=cfg.persistent,
        EVEN_K=w2.shape[2] % cfg.block_k2 == 0,
        EVEN_N=x.shape[1] % cfg.block_n2 == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2,
        GROUP_M=cfg.group_m2,
        EXPERT_GROUPS=cfg.expert_groups,
        SPLIT_TAIL=split_tail2,
        FOLD_TAILS=cfg.fold_tails2,
        COL_GROUP=cfg.col_group2,
        num_warps=cfg.num_warps2,
        num_stages=cfg.num_stages2,
    )


# Set by bench/compile_check.py, whose CPU tensors stand for a Hopper GPU's: the Gluon kernels are then compiled (for
# sm_90) where the interpreter, which cannot run them, would otherwise take the Triton kernels.
GLUON_COMPILE_ONLY = False


def _gluon_ready(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, cfg: KernelConfig) -> bool:
    """Whether ``cfg.gluon`` can run here: 16-bit operands on a Hopper GPU (or compile_check's stand-in), and TMA
    able to read x (sorted), w13, w2 and act in the config's boxes."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.is_cuda:
        if _capability_major(x.device.index) != 9:
            return False
    elif not GLUON_COMPILE_ONLY:
        return False
    hidden, inter = x.shape[1], w2.shape[2]
    size = x.element_size()
    return (
        _tma_rows_ok(x.device, hidden, size, cfg.block_k1)
        and _tma_rows_ok(x.device, inter, size, cfg.block_k2)
        and _tma_readable(w13, cfg.block_k1)
        and _tma_readable(w2, cfg.block_k2)
    )


def _gluon_layout(dtype: torch.dtype, block: list[int]):
    """The default NVMMA shared layout (swizzle) of ``block`` boxes of ``dtype``, as Gluon's descriptors take it."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(block, {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype])


def _gluon_descriptor(t: torch.Tensor, block: list[int]):
    """Gluon's TMA descriptor over 2-D ``t`` with ``block`` boxes and the default NVMMA swizzle for them."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block, _gluon_layout(t.dtype, block))


def _gluon_ring_args(x, w2, top_k: int, align, weights_flat, weights_on_input, cfg: KernelConfig) -> dict:
    """The arguments the two Gluon GEMMs share (the ring's depth is the kernel's own NUM_STAGES, and a ring needs
    two)."""
    return dict(stage_arg="NUM_STAGES", min_stages=2, sorted_ids_ptr=align.sorted_ids, expert_ids_ptr=align.expert_ids,
                expert_starts_ptr=align.expert_starts, num_padded_ptr=align.num_padded, topk_weights_ptr=weights_flat,
                num_slots=x.shape[0] * top_k, hidden=x.shape[1], inter=w2.shape[2], WEIGHTS_ON_INPUT=weights_on_input,
                BLOCK_M=cfg.block_m, EXPERT_GROUPS=cfg.expert_groups)  # fmt: skip


def _gluon_warps(num_warps: int, pingpong: bool) -> dict:
    """A Gluon GEMM's MMA warps: num_warps in one partition, or under ping-pong two warpgroups of num_warps / 2."""
    return dict(PINGPONG=pingpong, num_warps=num_warps // 2 if pingpong else num_warps)


def _launch_gluon_gemm1(
    x, w13, w2, b13, weights_flat, top_k: int, align, act, activation, gated, weights_on_input, swiglu_alpha,
    swiglu_limit, cfg: KernelConfig,
) -> None:  # fmt: skip
    """GEMM 1 as the Gluon kernel (``_gluon_experts``): x copied into padded sorted order and read through TMA (or,
    with ``gluon_gather``, its rows gathered by token inside the kernel); act written through TMA."""
    from tilemoe.ops._kernels._gluon_experts import _gluon_gemm1_kernel

    hidden = x.shape[1]
    inter = w2.shape[2]
    capacity = align.sorted_ids.numel()
    num_blocks_m = capacity // cfg.block_m
    b13_arg = b13 if b13 is not None else w13  # never read when HAS_BIAS is False
    ring = _gluon_ring_args(x, w2, top_k, align, weights_flat, weights_on_input, cfg)
    a_box = [cfg.block_m, cfg.block_k1]
    # the gather's 16-byte copies need x's rows at 16-byte boundaries (the kernel is told so); else the sorted copy
    gather = cfg.gluon_gather and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
    gather = gather and x.data_ptr() % 16 == 0
    launch_fitting(
        _gluon_gemm1_kernel,
        _grid(x.device, num_blocks_m * cdiv(inter, cfg.block_n1), cfg.persistent1),
        x.device,
        record_as="num_stages1",
        **ring,
        x_desc=x if gather else _gluon_descriptor(_sorted_rows(x, align, capacity, top_k), a_box),
        x_ptr=x,
        stride_xt=x.stride(0),
        top_k=top_k,
        GATHER=gather,
        A_LAYOUT=_gluon_layout(x.dtype, a_box),
        EVEN_K=hidden % cfg.block_k1 == 0,
        w_desc=_gluon_descriptor(w13.view(-1, hidden), [cfg.block_n1, cfg.block_k1]),
        act_desc=_gluon_descriptor(act, [cfg.block_m, cfg.block_n1]),
        b_ptr=b13_arg,
        stride_be=b13_arg.stride(0),
        stride_bn=b13_arg.stride(1),
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        ACTIVATION=activation,
        GATED=gated,
        HAS_BIAS=b13 is not None,
        BLOCK_N=cfg.block_n1,
        BLOCK_K=cfg.block_k1,
        GROUP_M=cfg.group_m1,
        NUM_STAGES=cfg.num_stages1,
        GATE_UP_DOT=cfg.gate_up_dot,
        **_gluon_warps(cfg.num_warps1, cfg.pingpong1),
    )


def _launch_gluon_gemm2(
    x, w2, b2, weights_flat, top_k: int, align, act, out, weights_on_input, atomic: bool, cfg: KernelConfig
) -> None:
    """GEMM 2 as the Gluon kernel: act (GEMM 1's output, Gluon's or Triton's) through TMA, added into the combine's
    output ``out`` (atomic) or stored per slot."""
    from tilemoe.ops._kernels._gluon_experts import _gluon_gemm2_kernel

    hidden = x.shape[1]
    inter = w2.shape[2]
    num_blocks_m = align.sorted_ids.numel() // cfg.block_m
    b2_arg = b2 if b2 is not None else w2
    launch_fitting(
        _gluon_gemm2_kernel,
        _grid(x.device, num_blocks_m * cdiv(hidden, cfg.block_n2), cfg.persistent),
        x.device,
        record_as="num_stages2",
        **_gluon_ring_args(x, w2, top_k, align, weights_flat, weights_on_input, cfg),
        act_desc=_gluon_descriptor(act, [cfg.block_m, cfg.block_k2]),
        w_desc=_gluon_descriptor(w2.view(-1, inter), [cfg.block_n2, cfg.block_k2]),
        b_ptr=b2_arg,
        stride_be=b2_arg.stride(0),
        stride_bh=b2_arg.stride(1),
        out_ptr=out,
        stride_om=out.stride(0),
        stride_oh=out.stride(1),
        top_k=top_k,
        HAS_BIAS=b2 is not None,
        ATOMIC=atomic,
        BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2,
        GROUP_M=cfg.group_m2,
        COL_GROUP=cfg.col_group2,
        NUM_STAGES=cfg.num_stages2,
        COMBINE=cfg.async_combine,
        STAGE_LAYOUT=_gluon_layout(out.dtype, [cfg.block_m, cfg.block_n2]) if cfg.async_combine else None,
        **_gluon_warps(cfg.num_warps2, cfg.pingpong2),
    )


# Polls of a one-launch GEMM 2 tile waiting for its rows before it gives up (sets the error word): ~1 s and more on
# an H100 (an acquire load of the ready words is ~0.5-1 us); the wait is a few tile times when all is well.
ONE_LAUNCH_MAX_SPIN = 1 << 21
# Programs of a one-launch kernel in the interpreter, which runs them one after the other without waiting: one, so
# every GEMM 1 tile comes before the GEMM 2 tiles that need it (tests raise it to see the ready check fail).
ONE_LAUNCH_INTERPRETER_PROGRAMS = 1


def _launch_one(
    gemm1_args: dict, x, w2, b2, weights_flat, act, align, atomic: bool, cfg: KernelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both GEMMs in one persistent launch (``KernelConfig.one_launch``), GEMM 1's arguments as ``_gemm1_kernel``
    takes them: (GEMM 2's output, as the two-launch path leaves it: per-slot rows, or the [T, H] sums when
    ``atomic``; the ready words, the last one the error word: 1 when a GEMM 2 tile gave up waiting)."""
    from tilemoe.ops._kernels._one_launch import _one_launch_kernel

    num_tokens, hidden = x.shape
    inter = w2.shape[2]
    capacity = align.sorted_ids.numel()
    nt1 = cdiv(inter, cfg.block_n1)
    ready = torch.zeros(capacity // cfg.block_m * nt1 + 1, dtype=torch.int32, device=x.device)
    out = _combine_output(x, gemm1_args["num_slots"], atomic)
    b2_arg = b2 if b2 is not None else w2
    w2_desc = _tma_descriptor(w2, cfg.block_n2, cfg.block_k2) if cfg.tma else None
    on_gpu = x.device.type == "cuda"
    tiles = capacity // cfg.block_m * (nt1 + cdiv(hidden, cfg.block_n2))
    programs = _persistent_grid(x.device, tiles) if on_gpu else ONE_LAUNCH_INTERPRETER_PROGRAMS
    launch_fitting(
        _one_launch_kernel,
        (programs,),
        x.device,
        record_as="num_stages1",
        **pdl_options(x.device),
        **gemm1_args,
        w2_ptr=w2 if w2_desc is None else w2_desc,
        stride_w2e=w2.stride(0),
        stride_w2h=w2.stride(1),
        stride_w2i=w2.stride(2),
        b2_ptr=b2_arg,
        stride_b2e=b2_arg.stride(0),
        stride_b2h=b2_arg.stride(1),
        out_ptr=out,
        stride_om=out.stride(0),
        stride_oh=out.stride(1),
        ready_ptr=ready,
        err_ptr=ready[-1:],
        max_spin=ONE_LAUNCH_MAX_SPIN,
        HAS_BIAS2=b2 is not None,
        ATOMIC=atomic,
        W2_TMA=w2_desc is not None,
        EVEN_K2=inter % cfg.block_k2 == 0,
        EVEN_N2=hidden % cfg.block_n2 == 0,
        BLOCK_N2=cfg.block_n2,
        BLOCK_K2=cfg.block_k2,
        GROUP_M2=cfg.group_m2,
        NT1_P2=max(2, 1 << (nt1 - 1).bit_length()),
        SPIN=on_gpu,
        num_warps=cfg.num_warps1,
        num_stages=cfg.num_stages1,
    )
    return out, ready


def _launch_decode(
    x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input, swiglu_alpha, swiglu_limit, cfg,
    route: tuple | None = None,
) -> torch.Tensor:  # fmt: skip
    """No alignment: GEMM 1 per (slot, column block), GEMM 2 per (token, column block) summing K (two launches),
    or per (slot, column block) plus the slot sum (``DECODE_GEMM2_PER_SLOT``, the default).
    ``route``: (logits [T, E], score code, renormalize, scale): GEMM 1 routes the tokens itself and fills
    topk_weights / topk_ids (then outputs, [T, K])."""
    from tilemoe.ops._kernels._decode import _decode_gemm1_kernel, _decode_gemm2_kernel

    num_tokens, hidden = x.shape
    inter = w2.shape[2]
    top_k = topk_ids.shape[1]
    weights_flat, ids_flat = topk_weights.reshape(-1), topk_ids.reshape(-1)
    logits, score, renormalize, scale = route if route is not None else (x, 0, False, 1.0)  # x: never read
    # without ROUTE the same constants every time (one compiled kernel whatever E and K, as the tuner's warm-up
    # expects: it compiles at a smaller E)
    route_constants = dict(ROUTE=False, ROUTE_TOP_K=1, ROUTE_SCORE=0, ROUTE_RENORMALIZE=False, ROUTE_BLOCK_E=16,
                           ROUTE_BLOCK_K=2)  # fmt: skip
    if route is not None:
        route_constants = dict(ROUTE=True, ROUTE_TOP_K=top_k, ROUTE_SCORE=score, ROUTE_RENORMALIZE=renormalize,
                               ROUTE_BLOCK_E=max(16, 1 << (w2.shape[0] - 1).bit_length()),
                               ROUTE_BLOCK_K=max(2, 1 << (top_k - 1).bit_length()))  # fmt: skip
    act = torch.empty((num_tokens * top_k, inter), dtype=x.dtype, device=x.device)
    b13_arg = b13 if b13 is not None else w13  # never read when HAS_BIAS is False
    launch_fitting(
        _decode_gemm1_kernel,
        (num_tokens * top_k, cdiv(inter, cfg.block_n1)),
        x.device,
        record_as="num_stages1",
        **pdl_options(x.device),
        x_ptr=x,
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        w_ptr=w13,
        stride_we=w13.stride(0),
        stride_wn=w13.stride(1),
        stride_wh=w13.stride(2),
        b_ptr=b13_arg,
        stride_be=b13_arg.stride(0),
        stride_bn=b13_arg.stride(1),
        topk_weights_ptr=weights_flat,
        topk_ids_ptr=ids_flat,
        logits_ptr=logits,
        stride_lt=logits.stride(0),
        stride_le=logits.stride(1),
        act_ptr=act,
        stride_as=act.stride(0),
        stride_ai=act.stride(1),
        top_k=top_k,
        num_experts=w2.shape[0],
        route_scale=scale,
        hidden=hidden,
        inter=inter,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        ACTIVATION=activation,
        GATED=gated,
        HAS_BIAS=b13 is not None,
        WEIGHTS_ON_INPUT=weights_on_input,
        FP32_PRECISE=x.dtype == torch.float32,
        BLOCK_N=cfg.block_n1,
        BLOCK_K=cfg.block_k1,
        **route_constants,
        num_warps=cfg.num_warps1,
        num_stages=cfg.num_stages1,
    )
    per_slot = top_k > 1 and DECODE_GEMM2_PER_SLOT
    rows = num_tokens * top_k if per_slot else num_tokens
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    b2_arg = b2 if b2 is not None else w2
    launch_fitting(
        _decode_gemm2_kernel,
        (rows, cdiv(hidden, cfg.block_n2)),
        x.device,
        record_as="num_stages2",
        **pdl_options(x.device),
        act_ptr=act,
        stride_as=act.stride(0),
        stride_ai=act.stride(1),
        w_ptr=w2,
        stride_we=w2.stride(0),
        stride_wh=w2.stride(1),
        stride_wi=w2.stride(2),
        b_ptr=b2_arg,
        stride_be=b2_arg.stride(0),
        stride_bh=b2_arg.stride(1),
        topk_weights_ptr=weights_flat,
        topk_ids_ptr=ids_flat,
        out_ptr=out,
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        top_k=1 if per_slot else top_k,  # per slot: each output row is one pick
        hidden=hidden,
        inter=inter,
        HAS_BIAS=b2 is not None,
        WEIGHTS_ON_INPUT=weights_on_input,
        FP32_PRECISE=x.dtype == torch.float32,
        BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2,
        num_warps=cfg.num_warps2,
        num_stages=cfg.num_stages2,
    )
    return sum_slots(out, top_k) if per_slot else out


def _launch_grouped_mm(
    x, w13, w2, topk_weights, topk_ids, b13, b2, activation, gated, weights_on_input, swiglu_alpha, swiglu_limit, cfg
) -> torch.Tensor:
    """Both expert GEMMs as torch grouped GEMMs (cuBLAS / CUTLASS) on the aligned rows; align, activation and combine
    as in the Triton path. Sync-free: the grouped GEMM takes the padded group ends as a device tensor."""
    num_tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    block_m = cfg.block_m
    align = moe_align(topk_ids, num_experts, block_m)
    capacity = align.sorted_ids.numel()
    group_ends = align.expert_starts[1:] * block_m  # each expert's padded rows end (int32)
    slot = align.sorted_ids.long()
    valid = slot < num_slots
    weights_flat = topk_weights.reshape(-1)
    rows = x[torch.where(valid, slot // top_k, 0)]  # padding rows: token 0, never read back
    if weights_on_input:
        row_weight = torch.where(valid, weights_flat[slot.clamp_max(num_slots - 1)], 0.0)
        rows = (rows.float() * row_weight[:, None]).to(x.dtype)
    expert_of_row = None
    if b13 is not None or b2 is not None:
        expert_of_row = align.expert_ids.long().repeat_interleave(block_m).clamp_max(num_experts - 1)
    h = grouped_matmul(rows, w13, group_ends)
    if b13 is not None:
        h += b13[expert_of_row]
    act = torch.empty((capacity, inter), dtype=x.dtype, device=x.device)
    launch_act_and_mul(h, act, activation=activation, gated=gated, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    y = grouped_matmul(act, w2, group_ends)
    if b2 is not None:
        y += b2[expert_of_row]
    # row of each slot: padding rows scatter into a discarded last entry
    row_of_slot = torch.empty(num_slots + 1, dtype=torch.long, device=x.device)
    row_of_slot.scatter_(0, slot, torch.arange(capacity, device=x.device))
    per_slot = y[row_of_slot[:num_slots]]
    if not weights_on_input:
        per_slot = (per_slot.float() * weights_flat[:, None]).to(x.dtype)
    return sum_slots(per_slot, top_k)
