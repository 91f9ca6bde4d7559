"""tilemoe's fused Triton MoE (``tilemoe.ops.fused_experts``): two fused expert GEMMs, no host sync.

Gather fused into GEMM 1's loads, the gated activation into its epilogue; routing weight and the combine in
GEMM 2's epilogue (atomic sums per token; ``triton_deterministic``, or ``triton`` under
torch.use_deterministic_algorithms(True): per-slot rows summed in order, bitwise repeatable); a sync-free
alignment, so the layer captures in a CUDA graph. Tile shapes from ``tilemoe.tuning.pick_config``. Runs on CUDA,
and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, for tests); "auto" takes it on CUDA, on the
CPU only in the interpreter.
"""

from __future__ import annotations

import os

from tilemoe.impls._registry import register_impl
from tilemoe.ops.act_and_mul import triton_kernels_available
from tilemoe.ops.fused_experts import fused_experts, fused_experts_from_logits

_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _register(name: str, description: str, auto_priority: int, deterministic: bool | None) -> None:
    """Register ``fused_experts`` (and, from router logits, ``fused_experts_from_logits``: on the decode path with a
    flat routing GEMM 1 routes, one launch less) as ``name`` with this combine (``fused_experts``' deterministic)."""

    def experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
        return fused_experts(
            x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2, deterministic=deterministic
        )

    def experts_from_logits(x, w13, w2, router_logits, *, config, correction_bias=None, b13=None, b2=None):
        out, _, _ = fused_experts_from_logits(
            x, w13, w2, router_logits, config=config, correction_bias=correction_bias, b13=b13, b2=b2,
            deterministic=deterministic,
        )  # fmt: skip
        return out

    register_impl(
        name,
        description=description,
        devices=_DEVICES,
        auto_priority=auto_priority,
        is_available=triton_kernels_available,
        from_logits=experts_from_logits,
        tuned=True,
    )(experts)


_register(
    "triton",
    "fused Triton MoE: gather+GEMM1+activation, GEMM2+weight+combine, sync-free alignment",
    auto_priority=100,
    deterministic=None,  # torch.use_deterministic_algorithms decides
)
_register(
    "triton_deterministic",
    "the fused Triton MoE with the deterministic combine: per-slot rows summed over K in order",
    auto_priority=0,
    deterministic=True,
)
