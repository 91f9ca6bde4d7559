"""Replay of the weights-on-input fault (bench/NOTES.md, version 6): many fresh bf16 runs of one-expert shapes, each
checked against the float64 reference; prints a line per (T, routing, tile variant) with failing runs.

    PYTHONPATH=src python3 bench/weights_on_input_probe.py      (a CUDA GPU; ~1 minute on an H100)

Routings: ``gelu``, ``silu`` and ``I128`` put the routing weight on the input (``sigmoid_top1_input_scaled``, Llama 4),
``plainrouting`` does not (``topk_softmax``). Tile variants: the config ``pick_config`` gives (128-row TMA tiles) and
four changes of it. Output of the runs before and after the fix: bench/results/session5-tune-and-fault.md.
"""

from __future__ import annotations

import dataclasses

import torch

from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.testing import assert_close, make_input, make_routing, make_weights
from tilemoe.tuning import MoEShape, pick_config


def reference(x, w, topk_weights, topk_ids, config):
    ref = get_impl("reference").fn
    d = {k: None if v is None else v.double() for k, v in w.items()}
    return ref(x.double(), d["w13"], d["w2"], topk_weights.double(), topk_ids, config=config, b13=d["b13"], b2=d["b2"])


def main() -> None:
    base = MoEConfig(num_experts=1, top_k=1, hidden_size=512, intermediate_size=96, activation="gelu", gated=True,
                     routing="sigmoid_top1_input_scaled")  # fmt: skip
    picked = pick_config(MoEShape(1000, 1, 1, 512, 96), torch.bfloat16, torch.cuda.get_device_name())
    print("picked", picked)
    variants = {
        "picked": picked,
        "tma0": dataclasses.replace(picked, tma=False),
        "bn1_64": dataclasses.replace(picked, block_n1=64),
        "stages3": dataclasses.replace(picked, num_stages1=3, num_stages2=3),
        "bn2_128": dataclasses.replace(picked, block_n2=128),
    }
    routings = {
        "gelu": base,
        "silu": base.replace(activation="silu"),
        "I128": base.replace(intermediate_size=128),
        "plainrouting": base.replace(routing="topk_softmax"),
    }
    for t in (1000, 1024, 300, 2000):
        for rname, config in routings.items():
            for vname, kc in variants.items():
                fails, msg = 0, ""
                for rep in range(3):
                    gen = torch.Generator().manual_seed(rep)
                    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
                    x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
                    tw, ti = make_routing(t, config, device="cuda", generator=gen)
                    out = fused_experts(x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"],
                                        kernel_config=kc)  # fmt: skip
                    try:
                        assert_close(out, reference(x, w, tw, ti, config), torch.bfloat16)
                    except AssertionError as error:
                        fails += 1
                        msg = str(error).splitlines()[0][:160]
                if fails:
                    print(f"T={t} {rname} {vname}: {fails}/3 FAIL {msg}")
    print("done")


if __name__ == "__main__":
    main()
