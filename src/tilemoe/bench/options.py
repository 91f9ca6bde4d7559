"""Flags shared by ``tilemoe bench`` and ``tilemoe journey``: the model, the device, the dtype, timing.

Model defaults: on a GPU the real qwen3-30b-a3b in bf16; on CPU (no flags) the same layer with H and I
scaled down by ``CPU_SCALE`` (E and K kept) in fp32, so the default run finishes in seconds there.
"""

from __future__ import annotations

import argparse

import torch

from tilemoe.config import ACTIVATIONS, MoEConfig

DEFAULT_MODEL = "qwen3-30b-a3b"
CPU_SCALE = 8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Used only while tilemoe.hf_config (the presets) is missing from this checkout; numbers from the model's
# config.json (num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size, norm_topk_prob).
_FALLBACK_PRESETS = {
    "qwen3-30b-a3b": dict(
        num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768, activation="silu", name="qwen3-30b-a3b"
    ),
}


def add_model_device_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help=f"preset name, config.json, model directory or HF id (default {DEFAULT_MODEL})",
    )
    g.add_argument("--manual-config", action="store_true", help="describe the layer with the four size flags")
    g.add_argument("--num-experts", type=int)
    g.add_argument("--num-experts-per-tok", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--intermediate-size", type=int, help="intermediate size of one expert")
    g.add_argument("--activation", choices=ACTIVATIONS, default=None)
    g.add_argument("--no-gate", action="store_true", help="plain expert MLP: act(x W1) W2 (no gate/up pair)")
    d = parser.add_argument_group("device")
    d.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on a GPU, fp32 on CPU")
    d.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when present)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--warmup-iters", type=int, default=None, help="default 10 on GPU, 2 on CPU")
    d.add_argument("--benchmark-iters", type=int, default=None, help="default 100 on GPU, 10 on CPU")
    d.add_argument("--rounds", type=int, default=5, help="timing rounds; implementations take turns within each")
    d.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays of the forward")
    d.add_argument(
        "--graph-calls",
        type=int,
        default=1,
        help="with --cuda-graph, layer calls per graph at T <= 256 (input sets in turn); a sample is a replay's "
        "time / calls: the layer inside a model's graph, not a graph launch per layer",
    )
    d.add_argument("--verbose", action="store_true")


def resolve_device(args: argparse.Namespace) -> torch.device:
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {args.device!r} asked, but torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    return device


def resolve_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[args.dtype]


def load_model_config(name: str) -> MoEConfig:
    """``MoEConfig.from_pretrained(name)``, with a built-in qwen3-30b-a3b while the presets module is absent."""
    try:
        return MoEConfig.from_pretrained(name)
    except ModuleNotFoundError as error:
        if error.name != "tilemoe.hf_config":
            raise
        if name in _FALLBACK_PRESETS:
            return MoEConfig(**_FALLBACK_PRESETS[name])
        raise ValueError(
            f"--model: presets are not available in this checkout (tilemoe.hf_config missing); "
            f"use {sorted(_FALLBACK_PRESETS)} or --manual-config, got {name!r}"
        ) from None


def resolve_config(args: argparse.Namespace, device: torch.device) -> tuple[MoEConfig, str, str]:
    """(config, model label, a note for the header) from the model or manual flags."""
    sizes = {
        "--num-experts": args.num_experts,
        "--num-experts-per-tok": args.num_experts_per_tok,
        "--hidden-size": args.hidden_size,
        "--intermediate-size": args.intermediate_size,
    }
    manual = args.manual_config or any(v is not None for v in sizes.values())
    if manual:
        if args.model is not None:
            raise ValueError("--model: give either --model or the manual size flags, not both")
        missing = [flag for flag, v in sizes.items() if v is None]
        if missing:
            raise ValueError(f"--manual-config: expected all four sizes, missing {', '.join(missing)}")
        config = MoEConfig(
            num_experts=args.num_experts,
            top_k=args.num_experts_per_tok,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            activation=args.activation or "silu",
            gated=not args.no_gate,
            name="manual",
        )
        return config, "manual", ""
    name = args.model or DEFAULT_MODEL
    config = load_model_config(name)
    changes = {}
    if args.activation is not None:
        changes["activation"] = args.activation
    if args.no_gate:
        changes["gated"] = False
    if changes:
        config = config.replace(**changes)
    note = ""
    if args.model is None and device.type == "cpu":
        config = config.replace(
            hidden_size=max(16, config.hidden_size // CPU_SCALE),
            intermediate_size=max(16, config.intermediate_size // CPU_SCALE),
        )
        note = (
            f"CPU default: {name} with hidden_size and intermediate_size scaled down {CPU_SCALE}x "
            f"(H={config.hidden_size}, I={config.intermediate_size}); num_experts and top_k kept. "
            f"Give --model {name} for the real sizes."
        )
    return config, name, note


def timing_defaults(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    on_gpu = device.type == "cuda"
    warmup = args.warmup_iters if args.warmup_iters is not None else (10 if on_gpu else 2)
    iters = args.benchmark_iters if args.benchmark_iters is not None else (100 if on_gpu else 10)
    if warmup < 0 or iters < 1:
        raise ValueError(f"--warmup-iters/--benchmark-iters: expected >= 0 / >= 1, got {warmup} / {iters}")
    return warmup, iters


def config_summary(config: MoEConfig) -> dict:
    return {
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "activation": config.activation,
        "gated": config.gated,
        "routing": config.routing,
    }
