"""The router GEMM + routing of a prefill batch: what the bench's layer ran (cuBLAS's bf16 F.linear, then
route_fast on its logits) against ``tilemoe.ops.route.route_tokens`` (router_logit_parts: the GEMM on the tensor
cores split over H, the routing kernel summing the parts), CUDA-graph replays of 20 calls in turn, bf16.

    PYTHONPATH=src python3 bench/route_tokens_probe.py [--models ...] [--tokens ...]

Also the float32 path the library took before (routing.router_logits: x and weight upcast, cuBLAS's float32 GEMM),
router_logits_fast (cuBLAS's 16-bit GEMM with float32 output above T=8) and the ids' agreement with the float64
reference routing. Above ROUTER_PARTS_MAX_TOKENS route_tokens is router_logits_fast + route_fast. A development
tool: claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton

from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.ops.route import route_fast, route_tokens
from tilemoe.ops.router import router_logits_fast, router_parts_layout
from tilemoe.routing import route, router_logits

MODELS = ["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b", "mixtral-8x7b"]
TOKENS = [16, 64, 256, 1024, 4096, 16384]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    args = parser.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}, {sms} SMs")
    print("| model | T | layout (block_t, block_e, parts, h/part) | cuBLAS bf16 + route | fp32 GEMM + route | "
          "router_logits_fast + route | route_tokens | ids off (of T*K) |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        config = MoEConfig.from_pretrained(model)
        e, h = config.num_experts, config.hidden_size
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(e, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
        bias = torch.rand(e, device="cuda", generator=gen) * 1e-3 if config.score_correction_bias else None
        for t in args.tokens:
            x = torch.randn(t, h, device="cuda", generator=gen).to(torch.bfloat16)
            kw = dict(correction_bias=bias)
            fns = [
                functools.partial(lambda x, w, c, kw: route_fast(torch.nn.functional.linear(x, w), c, **kw), x, w,
                                  config, kw),
                functools.partial(lambda x, w, c, kw: route_fast(router_logits(x, w), c, **kw), x, w, config, kw),
                functools.partial(lambda x, w, c, kw: route_fast(router_logits_fast(x, w), c, **kw), x, w, config, kw),
                functools.partial(route_tokens, x, w, config, **kw),
            ]  # fmt: skip
            ref_ids = route(router_logits(x.double(), w.double()), config, correction_bias=bias)[1]
            off = int((route_tokens(x, w, config, correction_bias=bias)[1].long() != ref_ids.long()).sum())
            us = graph_us_in_turn([(capture_graph(fn, 20)[0], 20) for fn in fns], 15)
            layout = router_parts_layout(t, e, h, sms)
            print(f"| {model} | {t} | {layout} | {us[0]:.1f} | {us[1]:.1f} | {us[2]:.1f} | {us[3]:.1f} | {off} |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
