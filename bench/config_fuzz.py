"""Random kernel configs x random layers through ``fused_experts``, against the float64 reference.

The tests pin each kernel form on a few chosen shapes; this draws the forms together (every KernelConfig field at
random, the combinations KernelConfig refuses drawn again) on random layers (E, K, H, I, T, activation, biases, a hot
expert), with every buffer the launchers allocate poisoned (NaN), so a form that leaves a row unwritten or reads one
it should not fails. On a CPU the Triton kernels run in the interpreter (fp16 / fp32: its tl.dot is wrong for bf16),
the Gluon forms as the Triton kernels they fall back to there; on a GPU add bf16.

    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/config_fuzz.py --cases 200 --seed 1
    PYTHONPATH=src python3 bench/config_fuzz.py --cases 500 --dtypes bf16 fp16     # on a GPU

Prints one line per failure (the seed of the case, the layer, the config) and a count; exits 1 on any failure.
``tests/ops/test_config_fuzz.py`` runs a few fresh seeds of it in every test run (bf16 too on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import traceback

import torch

from tilemoe.bench.options import DTYPES
from tilemoe.config import MoEConfig
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.testing import assert_close, make_input, make_routing, make_weights, poison_launchers, reference_experts
from tilemoe.tuning import KernelConfig

# the interpreter runs every tile: keep the layers small there
CPU_LIMITS = dict(experts=12, hidden=96, inter=64, tokens=80)
MID_LIMITS = dict(experts=24, hidden=160, inter=128, tokens=200)  # several blocks an expert in the interpreter: slow
GPU_LIMITS = dict(experts=64, hidden=640, inter=512, tokens=600)
LIMITS = {"cpu": CPU_LIMITS, "mid": MID_LIMITS, "gpu": GPU_LIMITS}


def random_layer(rng: random.Random, limits: dict) -> MoEConfig:
    experts = rng.randint(1, limits["experts"])
    gated = rng.random() < 0.75
    activations = ["silu", "gelu", "gelu_tanh", "relu"] + (["swigluoai"] if gated else [])
    return MoEConfig(
        num_experts=experts,
        top_k=rng.randint(1, min(experts, 8)),
        hidden_size=rng.randint(8, limits["hidden"]),
        intermediate_size=rng.randint(8, limits["inter"]),
        gated=gated,
        activation=rng.choice(activations),
        expert_bias=rng.random() < 0.4,
    )


def random_kernel_config(rng: random.Random, on_gpu: bool) -> KernelConfig:
    """A KernelConfig with every field drawn (flags each on with probability 0.3), drawn again until valid."""
    blocks = [16, 32, 64, 128] if on_gpu else [16, 32]
    while True:
        values = {}
        for name in (f.name for f in dataclasses.fields(KernelConfig)):
            if name == "block_m":
                values[name] = rng.choice(blocks if on_gpu else [16, 32, 64])
            elif name.startswith("block_"):
                values[name] = rng.choice(blocks)
            elif name.startswith("group_m"):
                values[name] = rng.choice([1, 2, 4, 8])
            elif name.startswith("num_warps"):
                values[name] = rng.choice([4, 8])
            elif name.startswith("num_stages"):
                values[name] = rng.choice([2, 3, 4])
            elif name == "col_group2":
                values[name] = rng.choice([0, 0, 1, 2, 3])
            elif name == "fold_gemm2":
                values[name] = rng.random() < 0.7
            elif name in ("decode", "grouped_mm"):
                values[name] = rng.random() < 0.1
            else:
                values[name] = rng.random() < 0.3
        try:
            return KernelConfig(**values)
        except ValueError:
            continue


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    config: MoEConfig
    kernel_config: KernelConfig
    num_tokens: int
    hot_expert: int | None
    deterministic: bool

    def __str__(self) -> str:
        c = self.config
        return (f"seed={self.seed} T={self.num_tokens} E={c.num_experts} K={c.top_k} H={c.hidden_size} "
                f"I={c.intermediate_size} gated={c.gated} act={c.activation} bias={c.expert_bias} "
                f"routing={c.routing} renormalize={c.renormalize} scaling={c.routed_scaling_factor} "
                f"groups={c.topk_group}/{c.n_group} correction_bias={c.score_correction_bias} "
                f"hot={self.hot_expert} deterministic={self.deterministic} "
                f"kernel_config={self.kernel_config.changes()}")  # fmt: skip


def draw_case(seed: int, on_gpu: bool, limits: dict) -> Case:
    """The case of ``seed``: a random layer, kernel config, token count, hot expert (a quarter of the cases) and
    combine mode."""
    rng = random.Random(seed)
    config = random_layer(rng, limits)
    kernel_config = random_kernel_config(rng, on_gpu)
    num_tokens = rng.choice([0, 1, rng.randint(2, 16), rng.randint(2, limits["tokens"])])
    hot_expert = rng.randrange(config.num_experts) if rng.random() < 0.25 else None
    return Case(seed, config, kernel_config, num_tokens, hot_expert, deterministic=rng.random() < 0.5)


def check_case(case: Case, dtype: torch.dtype, device: str) -> str | None:
    """None when ``fused_experts`` matches the float64 reference on the case's fresh inputs (seeded by its seed),
    else the case and what failed."""
    config, generator = case.config, torch.Generator().manual_seed(case.seed)
    try:
        w = make_weights(config, dtype=dtype, device=device, generator=generator)
        x = make_input(case.num_tokens, config, dtype=dtype, device=device, generator=generator)
        topk_weights, topk_ids = make_routing(case.num_tokens, config, device=device, generator=generator,
                                              hot_expert=case.hot_expert)  # fmt: skip
        out = fused_experts(x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, b13=w["b13"], b2=w["b2"],
                            kernel_config=case.kernel_config, deterministic=case.deterministic)  # fmt: skip
        assert out.shape == x.shape and out.dtype == dtype, f"out {tuple(out.shape)} {out.dtype}"
        assert_close(out, reference_experts(x, w, topk_weights, topk_ids, config), dtype)
    except Exception:  # noqa: BLE001 - every failure is a finding, reported with its case
        return case_failure(case, dtype)
    return None


def case_failure(case: Case, dtype: torch.dtype) -> str:
    """The report of a case that raised (call it in the ``except``): the case, its dtype, the exception's last line."""
    return f"{case} dtype={str(dtype)[6:]}\n    " + traceback.format_exc().strip().splitlines()[-1]


def fuzz_main(name: str, doc: str, draw, check, argv: list[str] | None = None) -> int:
    """The command line of a fuzzer: ``draw(seed, on_gpu, limits)`` a case, ``check(case, dtype, device)`` it (None
    or the failure), ``--cases`` of them from ``--seed``, the dtypes in turn; prints each failure and a count."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="first case's seed; case i uses seed + i")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: fp16 fp32 on a CPU, bf16 fp16 on a GPU")  # fmt: skip
    parser.add_argument("--limits", choices=list(LIMITS), default=None,
                        help="the layers' size limits (default: this machine's, cpu or gpu)")  # fmt: skip
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.dtypes or (["bf16", "fp16"] if device == "cuda" else ["fp16", "fp32"])
    limits = LIMITS[args.limits or ("gpu" if device == "cuda" else "cpu")]
    poison_launchers()
    failures = 0
    for i in range(args.cases):
        failure = check(draw(args.seed + i, device == "cuda", limits), DTYPES[names[i % len(names)]], device)
        if failure:
            failures += 1
            print("FAIL", failure, flush=True)
    print(f"{name}: {args.cases - failures} of {args.cases} cases match the reference on {device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(fuzz_main("config_fuzz", __doc__, draw_case, check_case))
