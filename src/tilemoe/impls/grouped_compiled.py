"""Level 6 of the ladder: level 4 with its pieces compiled by ``torch.compile``.

What changes from level 4: TorchInductor compiles the three pieces of the grouped forward, the sort and
gather before the experts, one expert's MLP (matmul, bias, activation, matmul, bias) and the weighting and
scatter after, fusing their elementwise work (bias adds, the activation and product, the weighting) into
generated kernels, so each expert launches fewer kernels and moves fewer intermediate tensors.

The Python loop over experts stays outside the compiled code: compiling it whole would specialise on the
per-expert counts it reads from the host and recompile for every new routing. The pieces are compiled with
``dynamic=True``, so new token counts and expert slice sizes reuse the same code.

Available where ``torch.compile`` works: on CUDA, and on CPU when a C++ compiler is found (Inductor
generates C++ there). The first calls compile (seconds); the bench's warm-up absorbs that.
"""

from __future__ import annotations

import functools
import shutil

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.impls.grouped import sort_by_expert
from tilemoe.ops.activation import act_and_mul_torch


def _compile_available() -> bool:
    if not hasattr(torch, "compile"):
        return False
    if torch.cuda.is_available():
        return True
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def _prepare(x, topk_weights, topk_ids, num_experts: int, weights_on_input: bool):
    order, token_of_row, counts = sort_by_expert(topk_ids, num_experts)
    weight_of_row = topk_weights.reshape(-1)[order].unsqueeze(1)
    rows = x[token_of_row]
    if weights_on_input:
        rows = (rows * weight_of_row).to(x.dtype)
    return rows, token_of_row, weight_of_row, counts


def _expert(rows, w13_e, w2_e, b13_e, b2_e, config):
    h = rows @ w13_e.t()
    if b13_e is not None:
        h = h + b13_e
    y = act_and_mul_torch(h, config) @ w2_e.t()
    if b2_e is not None:
        y = y + b2_e
    return y


def _combine(y, token_of_row, weight_of_row, num_tokens: int, weights_on_input: bool):
    y = y.float()
    if not weights_on_input:
        y = y * weight_of_row
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, token_of_row, y)


@functools.cache
def _compiled():
    return tuple(torch.compile(fn, dynamic=True) for fn in (_prepare, _expert, _combine))


@register_impl(
    "grouped_compiled",
    level=6,
    description="level 4 with sort, expert MLP and combine compiled by torch.compile (fused elementwise work)",
    auto_priority=6,
    is_available=_compile_available,
)
def grouped_compiled_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    prepare, expert_fn, combine = _compiled()
    num_experts = w13.shape[0]
    rows, token_of_row, weight_of_row, counts = prepare(x, topk_weights, topk_ids, num_experts, config.weights_on_input)
    y = torch.empty_like(rows)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        stop = start + n
        y[start:stop] = expert_fn(
            rows[start:stop],
            w13[expert],
            w2[expert],
            None if b13 is None else b13[expert],
            None if b2 is None else b2[expert],
            config,
        )
        start = stop
    return combine(y, token_of_row, weight_of_row, x.shape[0], config.weights_on_input).to(x.dtype)
