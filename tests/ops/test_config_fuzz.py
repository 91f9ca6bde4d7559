"""bench/config_fuzz.py and layer_fuzz.py in the suite: random kernel configs on random layers, and random routings
through fused_experts_from_logits (the ids route_fast's), against the float64 reference, every launcher buffer poisoned;
fresh seeds each run (a failure names its seed: `python3 bench/config_fuzz.py --seed S --cases 1` repeats it)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tilemoe.testing import poison_launchers

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    """bench/<name>.py as module ``name``, registered in sys.modules (its dataclasses look their module up there, and
    layer_fuzz imports config_fuzz by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_fuzz = _load("config_fuzz")
layer_fuzz = _load("layer_fuzz")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
LIMITS = config_fuzz.GPU_LIMITS if ON_GPU else config_fuzz.CPU_LIMITS
CASES_PER_TEST = 8
# the interpreter's tl.dot is wrong for bf16: bf16 on the GPU only
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture
def poisoned(monkeypatch):
    poison_launchers(monkeypatch.setattr)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("part", range(2))
def test_random_kernel_configs_match_the_reference(part, dtype, poisoned):
    first = torch.seed() % 2**31
    cases = [config_fuzz.draw_case(first + i, ON_GPU, LIMITS) for i in range(CASES_PER_TEST)]
    failures = [failure for case in cases if (failure := config_fuzz.check_case(case, dtype, DEVICE))]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_layers_match_the_reference(dtype, poisoned):
    first = torch.seed() % 2**31
    cases = [layer_fuzz.draw_layer_case(first + i, ON_GPU, LIMITS) for i in range(CASES_PER_TEST)]
    failures = [failure for case in cases if (failure := layer_fuzz.check_layer_case(case, dtype, DEVICE))]
    assert not failures, "\n".join(failures)


def test_the_fuzzer_reports_an_unwritten_row(poisoned, monkeypatch):
    # a fused_experts that leaves its last output row as the poison: the case comes back as a failure naming its seed
    real = config_fuzz.fused_experts

    def last_row_unwritten(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        out[-1] = float("nan")
        return out

    monkeypatch.setattr(config_fuzz, "fused_experts", last_row_unwritten)
    cases = (config_fuzz.draw_case(seed, ON_GPU, LIMITS) for seed in range(100))
    case = next(case for case in cases if case.num_tokens)
    failure = config_fuzz.check_case(case, torch.float32, DEVICE)
    assert failure is not None and failure.startswith(f"seed={case.seed} T={case.num_tokens} ")
    assert config_fuzz.check_case(case, torch.float32, DEVICE) == failure  # a seed repeats its case
