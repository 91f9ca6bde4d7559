"""Random routings through the triton layer's own routing, ``fused_experts_from_logits``, against the float64 reference.

``config_fuzz.py`` draws kernel configs on experts routed beforehand; this draws the routing too (every routing,
groups, the correction bias, the scaling, renormalisation) with a kernel config drawn as there (in half the cases a
decode one, whose GEMM 1 routes the tokens itself up to ``ROUTE_MAX_TOKENS``, here raised from 1 to 16 so that path
runs often), every launcher buffer poisoned. Checked: the ids and weights are exactly ``route_fast``'s (on the CPU,
where the decode GEMM 1 routes: ``route_triton``'s, the kernel ``route_fast`` runs on a GPU; the routing against
float64 is ``tests/ops/test_route.py``'s), and the output matches the float64 experts on them.

    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/layer_fuzz.py --cases 200 --seed 1
    PYTHONPATH=src python3 bench/layer_fuzz.py --cases 300 --dtypes bf16 fp16     # on a GPU

Prints one line per failure (its seed, the layer, the config) and a count; exits 1 on any failure.
"""

from __future__ import annotations

import dataclasses
import random
import sys

import torch
from config_fuzz import Case, case_failure, draw_case, fuzz_main, random_kernel_config

import tilemoe.ops.fused_experts as fused_experts_module
from tilemoe.config import ROUTINGS, MoEConfig
from tilemoe.ops.route import route_fast, route_triton
from tilemoe.testing import assert_close, make_input, make_weights, reference_experts

ROUTE_MAX_TOKENS = 16


def random_routing(rng: random.Random, config: MoEConfig) -> MoEConfig:
    """``config`` with a routing drawn (groups, correction bias, scaling, renormalisation), drawn again until
    MoEConfig takes it."""
    experts = config.num_experts
    while True:
        routing = rng.choice(ROUTINGS)
        n_group = rng.choice([d for d in range(1, experts + 1) if experts % d == 0])
        try:
            return config.replace(
                routing=routing,
                top_k=1 if routing == "sigmoid_top1_input_scaled" else config.top_k,
                renormalize=rng.random() < 0.7,
                routed_scaling_factor=rng.choice([1.0, 1.0, 2.5]),
                n_group=n_group,
                topk_group=rng.randint(1, n_group),
                score_correction_bias=routing == "sigmoid_grouped_topk" and rng.random() < 0.7,
            )
        except ValueError:
            continue


def draw_layer_case(seed: int, on_gpu: bool, limits: dict) -> Case:
    """config_fuzz's case of ``seed`` with a routing drawn (its hot expert dropped: the routing decides), in half the
    cases with a decode kernel config and at most ROUTE_MAX_TOKENS tokens half the time."""
    rng = random.Random(seed)
    case = draw_case(seed, on_gpu, limits)
    if rng.random() < 0.5:  # a decode config: its GEMM 1 routes (flat routings, T <= ROUTE_MAX_TOKENS)
        kernel_config = random_kernel_config(rng, on_gpu)
        while not kernel_config.decode:
            kernel_config = random_kernel_config(rng, on_gpu)
        num_tokens = rng.choice([case.num_tokens, rng.randint(1, ROUTE_MAX_TOKENS)])
        case = dataclasses.replace(case, kernel_config=kernel_config, num_tokens=num_tokens)
    return dataclasses.replace(case, config=random_routing(rng, case.config), hot_expert=None)


def check_layer_case(case: Case, dtype: torch.dtype, device: str) -> str | None:
    """None when the routing is route_fast's and the output matches the float64 experts on it, else what failed."""
    config, generator = case.config, torch.Generator().manual_seed(case.seed)
    saved = fused_experts_module.DECODE_ROUTE_MAX_TOKENS
    fused_experts_module.DECODE_ROUTE_MAX_TOKENS = ROUTE_MAX_TOKENS
    try:
        w = make_weights(config, dtype=dtype, device=device, generator=generator)
        x = make_input(case.num_tokens, config, dtype=dtype, device=device, generator=generator)
        logits = torch.randn(case.num_tokens, config.num_experts, generator=generator).to(device)
        bias = None
        if config.score_correction_bias:
            bias = (torch.randn(config.num_experts, generator=generator) * 0.1).to(device)
        out, weights, ids = fused_experts_module.fused_experts_from_logits(
            x, w["w13"], w["w2"], logits, config=config, correction_bias=bias, b13=w["b13"], b2=w["b2"],
            kernel_config=case.kernel_config, deterministic=case.deterministic,
        )  # fmt: skip
        assert out.shape == x.shape and out.dtype == dtype, f"out {tuple(out.shape)} {out.dtype}"
        # route_fast runs the routing kernel for CUDA logits, torch's routing on the CPU, where the decode GEMM 1's
        # routing (the routing kernel's arithmetic, interpreted) is then held to the routing kernel's
        routes_in_gemm1 = fused_experts_module.decode_gemm1_routes(case.kernel_config, case.num_tokens, config,
                                                                   logits.dtype)  # fmt: skip
        routing = route_triton if routes_in_gemm1 and device == "cpu" else route_fast
        ref_weights, ref_ids = routing(logits, config, correction_bias=bias)
        name = routing.__name__
        assert torch.equal(ids, ref_ids), f"ids {ids.tolist()} != {name}'s {ref_ids.tolist()}"
        assert torch.equal(weights, ref_weights), f"weights {weights.tolist()} != {name}'s {ref_weights.tolist()}"
        assert_close(out, reference_experts(x, w, weights, ids, config), dtype)
    except Exception:  # noqa: BLE001 - every failure is a finding, reported with its case
        return case_failure(case, dtype)
    finally:
        fused_experts_module.DECODE_ROUTE_MAX_TOKENS = saved
    return None


if __name__ == "__main__":
    sys.exit(fuzz_main("layer_fuzz", __doc__, draw_layer_case, check_layer_case))
