"""``ExpertParallelMoE(backend="fused")`` argument checks that need no GPU (one gloo process)."""

from __future__ import annotations

import sys

import torch

from tilemoe.distributed.spawn import raise_on_failure, spawn_ranks

START = "forkserver" if sys.platform.startswith("linux") and not torch.cuda.is_initialized() else "spawn"


def _errors(rank, world):
    from tilemoe import MoEConfig
    from tilemoe.distributed import ExpertParallelMoE

    config = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    messages = []
    for kwargs in ({}, {"max_tokens": 8, "capacity": 4}, {"max_tokens": 8}):
        try:
            ExpertParallelMoE(config, None, "fused", device="cpu", **kwargs)
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_fused_layer_bad_arguments_name_the_cause():
    messages = raise_on_failure(spawn_ranks(_errors, 1, backend="gloo", timeout_s=60, start_method=START))[0]
    assert len(messages) == 3
    assert "expected max_tokens" in messages[0]  # the buffers are sized at init
    assert "capacity=4" in messages[1]  # the fused path is dropless: no capacity
    assert "needs CUDA" in messages[2] and "cpu" in messages[2]
