"""Routing scenarios for the bench: which experts each token goes to.

Every generator returns (topk_weights [T, K] float32, topk_ids [T, K] int32) with K distinct experts per
token, on ``device``, from a ``torch.Generator`` so a seed gives the same routing everywhere.

    random      router logits from a random router weight [E, H] applied to the input, through the
                config's own routing (softmax/sigmoid, groups, renormalisation): what a fresh model does
    balanced    every expert gets T*K/E pairs, or one more / one fewer when E does not divide T*K
    imbalanced  one hot expert takes ``factor`` times the average load (capped at T), the rest shared evenly;
                the achieved max_load/avg_load is reported (it cannot exceed E/K, nor T/avg)
                (both: the experts that share a token drawn at random, as a router's are)
    zipf        expert e (in a random order) drawn with probability proportional to 1 / rank**alpha
    trace       ids replayed from a file (``load_trace``)

Routing-trace file format (``--routing-trace FILE``):
    .pt    a LongTensor/IntTensor [T, K] of expert ids, or a dict {"topk_ids": [T, K], "topk_weights": [T, K]}
    .npy   an int array [T, K] of expert ids
    .json  a list of T lists of K ids, or {"topk_ids": [[...], ...], "topk_weights": [[...], ...]}
Missing weights are 1/K each. A trace shorter than the token count is repeated; a longer one is cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tilemoe.config import MoEConfig
from tilemoe.routing import route, router_logits

SCENARIOS = ("random", "balanced", "imbalanced", "zipf", "trace")

__all__ = ["SCENARIOS", "expert_loads", "load_trace", "make_routing_for"]


def expert_loads(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs routed to each expert: [E] int64 (on the CPU)."""
    return torch.bincount(topk_ids.reshape(-1).long().cpu(), minlength=num_experts)


def _random_weights(num_tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.rand(num_tokens, k, generator=generator) + 0.05
    return w / w.sum(dim=-1, keepdim=True)


# Rounds of _mix_tokens per expert a token holds: an entry moves in a round with probability p / K (p: the share of
# swaps kept, about (1 - K / E) ** 2: 0.56 at top-2 of 8 experts, 0.88 at top-8 of 128), so after 12 K rounds it has
# stayed put with probability (1 - p / K) ** (12 K): 4e-4 at top-2 of 8, 1e-5 at top-8 of 128.
MIX_ROUNDS_PER_K = 12


def _ids_from_counts(counts: list[int], num_tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[T, K] ids where expert e appears counts[e] times, never twice in one token, and which experts share a token
    random.

    Writes the experts' runs one after another into the T*K slots in slot-major order (slot j -> token j % T),
    so a run of length <= T covers distinct tokens. That alone gives every token of one stretch the same K experts
    (16 distinct expert sets over 16384 tokens at top-8 of 128 experts, where a router's are nearly all distinct:
    each x row's K uses then sit at fixed distances in a kernel's tile order, a cache pattern no router gives), so
    ``_mix_tokens`` swaps entries between random pairs of tokens until every entry has moved. Then the slots are
    shuffled.
    """
    assert sum(counts) == num_tokens * k and max(counts, default=0) <= num_tokens
    flat = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    ids = flat.view(k, num_tokens).t().contiguous()  # slot-major: column k holds the k-th block of T
    ids = _mix_tokens(ids, MIX_ROUNDS_PER_K * k, generator)
    slot_order = torch.argsort(torch.rand(num_tokens, k, generator=generator), dim=1)
    return ids.gather(1, slot_order)


def _mix_tokens(ids: torch.Tensor, rounds: int, generator: torch.Generator) -> torch.Tensor:
    """``ids`` [T, K] (K distinct per row) after ``rounds`` rounds of swaps: each round pairs the tokens at random and
    swaps one random entry of each pair's first token with one of its second's, where neither token would then hold
    an expert twice. Swaps keep every expert's count and every token's experts distinct."""
    t, k = ids.shape
    half = t // 2
    if half == 0 or k == 0:
        return ids
    ids = ids.clone()
    for _ in range(rounds):
        order = torch.randperm(t, generator=generator)
        first, second = order[:half], order[half : 2 * half]  # disjoint: the round's swaps do not interfere
        col_a = torch.randint(k, (half,), generator=generator)
        col_b = torch.randint(k, (half,), generator=generator)
        a, b = ids[first, col_a], ids[second, col_b]
        ok = ~((ids[second] == a[:, None]).any(dim=1) | (ids[first] == b[:, None]).any(dim=1))
        ids[first[ok], col_a[ok]] = b[ok]
        ids[second[ok], col_b[ok]] = a[ok]
    return ids


def balanced_counts(num_tokens: int, config: MoEConfig) -> list[int]:
    total, e = num_tokens * config.top_k, config.num_experts
    return [total // e + (1 if expert < total % e else 0) for expert in range(e)]


def imbalanced_counts(num_tokens: int, config: MoEConfig, factor: float) -> list[int]:
    """One hot expert with round(factor * avg) pairs (at most T, at least the balanced share), rest even."""
    total, e = num_tokens * config.top_k, config.num_experts
    if e == 1:
        return [total]
    avg = total / e
    hot = int(min(num_tokens, max(round(factor * avg), -(-total // e))))
    rest = total - hot
    # the others share the rest evenly; none may exceed T either (fine: rest/(E-1) <= avg <= T)
    cold = [rest // (e - 1) + (1 if i < rest % (e - 1) else 0) for i in range(e - 1)]
    return [hot, *cold]


def load_trace(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a routing trace (format in the module docstring): (ids [T, K] int64, weights [T, K] or None).

    Raises ValueError for an unknown suffix or a trace that is not [T, K].
    """
    path = Path(path)
    weights = None
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".npy":
        import numpy as np

        data = torch.from_numpy(np.load(path))
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"routing_trace: expected a .pt, .npy or .json file, got {str(path)!r}")
    if isinstance(data, dict):
        if "topk_ids" not in data:
            raise ValueError(f"routing_trace: expected a 'topk_ids' entry in {path}, got keys {sorted(data)}")
        if data.get("topk_weights") is not None:
            weights = torch.as_tensor(data["topk_weights"], dtype=torch.float32)
        data = data["topk_ids"]
    ids = torch.as_tensor(data).long()
    if ids.dim() != 2:
        raise ValueError(f"routing_trace: expected ids of shape [T, K], got {list(ids.shape)} in {path}")
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(f"routing_trace: topk_weights shape {list(weights.shape)} != topk_ids {list(ids.shape)}")
    return ids, weights


def _from_trace(num_tokens, config, trace):
    ids, weights = trace
    if ids.shape[1] != config.top_k:
        raise ValueError(f"routing_trace: expected K={config.top_k} ids per token, got {ids.shape[1]}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_experts):
        raise ValueError(f"routing_trace: expected ids in [0, {config.num_experts}), got [{ids.min()}, {ids.max()}]")
    if ids.shape[0] == 0:
        raise ValueError("routing_trace: the trace holds no tokens")
    reps = -(-num_tokens // ids.shape[0])
    ids = ids.repeat(reps, 1)[:num_tokens]
    if weights is None:
        weights = torch.full(ids.shape, 1.0 / config.top_k)
    else:
        weights = weights.repeat(reps, 1)[:num_tokens]
    return weights, ids


def make_routing_for(
    scenario: str,
    num_tokens: int,
    config: MoEConfig,
    *,
    generator: torch.Generator,
    x: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    imbalance_factor: float = 3.0,
    zipf_alpha: float = 1.2,
    trace: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, K] float32, topk_ids [T, K] int32) on ``device`` for one scenario.

    ``x`` [T, H] is the layer input (used by "random"); ``trace`` comes from ``load_trace``.
    Raises ValueError for an unknown scenario or a missing trace.
    """
    t, k, e = num_tokens, config.top_k, config.num_experts
    if scenario == "random":
        if x is None:
            x = torch.randn(t, config.hidden_size, generator=generator)
        weight = torch.randn(e, config.hidden_size, generator=generator) * config.hidden_size**-0.5
        logits = router_logits(x.detach().float().cpu(), weight)
        weights, ids = route(logits, config)
    elif scenario == "balanced":
        ids = _ids_from_counts(balanced_counts(t, config), t, k, generator)
        ids = torch.randperm(e, generator=generator)[ids]  # which experts are which: random
        weights = _random_weights(t, k, generator)
    elif scenario == "imbalanced":
        if imbalance_factor < 1.0:
            raise ValueError(f"imbalance_factor: expected >= 1.0, got {imbalance_factor}")
        ids = _ids_from_counts(imbalanced_counts(t, config, imbalance_factor), t, k, generator)
        ids = torch.randperm(e, generator=generator)[ids]
        weights = _random_weights(t, k, generator)
    elif scenario == "zipf":
        if zipf_alpha <= 0:
            raise ValueError(f"zipf_alpha: expected > 0, got {zipf_alpha}")
        ranks = torch.randperm(e, generator=generator).double() + 1.0
        probs = (1.0 / ranks**zipf_alpha).float()
        ids = torch.multinomial(probs.expand(t, e), k, replacement=False, generator=generator) if t else None
        ids = ids if ids is not None else torch.empty(0, k, dtype=torch.long)
        weights = _random_weights(t, k, generator)
    elif scenario == "trace":
        if trace is None:
            raise ValueError("scenario 'trace': expected --routing-trace FILE, got none")
        weights, ids = _from_trace(t, config, trace)
    else:
        raise ValueError(f"scenario: expected one of {SCENARIOS}, got {scenario!r}")
    return weights.float().contiguous().to(device), ids.to(torch.int32).contiguous().to(device)
