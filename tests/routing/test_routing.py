"""tilemoe.routing.route against hand-written references and the routers of transformers' own MoE models.

Parity with transformers: each family's tiny HF config goes through ``config_from_hf_dict``; the HF router
module and ``route`` see the same random weights and tokens and must pick the same experts with the same
weights (compared as sets per token, since some HF routers return top-k unsorted).
"""

from __future__ import annotations

import math

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.hf_config import config_from_hf_dict
from tilemoe.routing import choice_scores, route, router_logits, topk_stable

ROUTINGS = (
    "softmax_topk",
    "topk_softmax",
    "sigmoid_grouped_topk",
    "softmax_grouped_topk",
    "sigmoid_top1_input_scaled",
)


def cfg(routing: str = "softmax_topk", e: int = 8, k: int = 2, **kw) -> MoEConfig:
    if routing in ("sigmoid_grouped_topk", "softmax_grouped_topk"):
        kw.setdefault("n_group", 4)
        kw.setdefault("topk_group", 2)
    return MoEConfig(num_experts=e, top_k=k, hidden_size=16, intermediate_size=8, routing=routing, **kw)


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's (id, weight) pairs by id, so unsorted and sorted top-k compare equal."""
    ids = ids.long()
    order = ids.argsort(dim=-1)
    return weights.gather(1, order).float(), ids.gather(1, order)


# ----------------------------------------------------------------------------- hand-written references
def reference_route(logits: torch.Tensor, c: MoEConfig, bias: torch.Tensor | None = None):
    """Token by token in float64 with Python sorting: the routing math spelled out."""
    out_w, out_i = [], []
    for row in logits.double().tolist():
        e = len(row)
        if c.routing in ("softmax_topk", "softmax_grouped_topk"):
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        elif c.routing == "sigmoid_grouped_topk":
            scores = [1 / (1 + math.exp(-v)) for v in row]
        else:
            scores = row
        choice = [s + (float(bias[j]) if bias is not None else 0.0) for j, s in enumerate(scores)]
        allowed = list(range(e))
        if c.routing in ("sigmoid_grouped_topk", "softmax_grouped_topk"):
            per = e // c.n_group
            groups = []
            for g in range(c.n_group):
                vals = sorted(choice[g * per : (g + 1) * per], reverse=True)
                worth = sum(vals[:2]) if c.routing == "sigmoid_grouped_topk" else vals[0]
                groups.append((-worth, g))
            keep = [g for _, g in sorted(groups)[: c.topk_group]]
            allowed = [j for j in range(e) if j // per in keep]
        picked = sorted(allowed, key=lambda j: (-choice[j], j))[: c.top_k]
        if c.routing == "topk_softmax":
            m = max(row[j] for j in picked)
            ex = [math.exp(row[j] - m) for j in picked]
            w = [v / sum(ex) for v in ex]
        elif c.routing == "sigmoid_top1_input_scaled":
            w = [1 / (1 + math.exp(-row[j])) for j in picked]
        else:
            w = [scores[j] for j in picked]
            if c.renormalize:
                w = [v / sum(w) for v in w]
        out_w.append([v * c.routed_scaling_factor for v in w])
        out_i.append(picked)
    k = c.top_k
    return (
        torch.tensor(out_w, dtype=torch.float64).reshape(-1, k),
        torch.tensor(out_i, dtype=torch.int64).reshape(-1, k),
    )


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_hand_reference(routing, renormalize, generator):
    c = cfg(routing, e=12, k=3, renormalize=renormalize, routed_scaling_factor=1.5)
    logits = torch.randn(37, 12, generator=generator) * 2
    bias = torch.randn(12, generator=generator) * 0.3 if routing == "sigmoid_grouped_topk" else None
    w, ids = route(logits, c, correction_bias=bias)
    ref_w, ref_ids = reference_route(logits, c, bias)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t", [0, 1, 5])  # T=0: empty routing; T=1: decode step
def test_output_dtypes_and_shapes(routing, dtype, t, generator):
    c = cfg(routing, e=8, k=2)
    w, ids = route(torch.randn(t, 8, generator=generator).to(dtype), c)
    assert w.shape == (t, 2) and ids.shape == (t, 2)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ids.dtype == torch.int32
    assert w.is_contiguous() and ids.is_contiguous()
    if t:
        assert int(ids.min()) >= 0 and int(ids.max()) < 8
        # every token's K ids are distinct experts
        assert all(len(set(row)) == 2 for row in ids.tolist())


@pytest.mark.parametrize("routing", ROUTINGS)
def test_ties_go_to_the_lower_expert_index(routing):
    c = cfg(routing, e=8, k=3)
    w, ids = route(torch.zeros(4, 8), c)  # every expert scores the same
    assert ids.tolist() == [[0, 1, 2]] * 4
    # a partial tie: experts 5 and 2 share the best logit, 7 and 3 the second best
    logits = torch.full((1, 8), -1.0)
    logits[0, [5, 2]] = 2.0
    logits[0, [7, 3]] = 1.0
    w, ids = route(logits, c)
    # grouped routings (groups of 2 experts, 2 of 4 kept) keep {2, 3} and {4, 5}: the same picks
    assert ids.tolist() == [[2, 5, 3]]
    # the same ids on every call (no dependence on sort internals)
    assert torch.equal(route(logits, c)[1], ids)


def test_topk_stable_breaks_ties_low_index_first():
    values, idx = topk_stable(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]), 3)
    assert idx.tolist() == [[1, 2, 4]]
    assert values.tolist() == [[3.0, 3.0, 3.0]]


def test_softmax_topk_by_hand():
    # probabilities 1/10, 2/10, 3/10, 4/10
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    w, ids = route(logits, cfg("softmax_topk", e=4, k=2, renormalize=False))
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]))
    w, _ = route(logits, cfg("softmax_topk", e=4, k=2, renormalize=True))
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7]]))


def test_topk_softmax_by_hand():
    logits = torch.tensor([[0.0, 5.0, math.log(3.0) + 5.0, -2.0]])
    w, ids = route(logits, cfg("topk_softmax", e=4, k=2))
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))


def test_sigmoid_top1_input_scaled_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    w, ids = route(logits, cfg("sigmoid_top1_input_scaled", e=4, k=1, renormalize=False))
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[2.0]])))


@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_grouped_topk", "softmax_grouped_topk"])
def test_renormalize_makes_weights_sum_to_one(routing, generator):
    logits = torch.randn(20, 8, generator=generator)
    w, _ = route(logits, cfg(routing, renormalize=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    w_raw, _ = route(logits, cfg(routing, renormalize=False))
    assert not torch.allclose(w_raw.sum(-1), torch.ones(20))
    torch.testing.assert_close(w, w_raw / w_raw.sum(-1, keepdim=True))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_routed_scaling_factor_scales_weights_only(routing, generator):
    logits = torch.randn(9, 8, generator=generator)
    w1, ids1 = route(logits, cfg(routing))
    w25, ids25 = route(logits, cfg(routing, routed_scaling_factor=2.5))
    assert torch.equal(ids1, ids25)
    torch.testing.assert_close(w25, 2.5 * w1)


def test_correction_bias_moves_choice_not_weights(generator):
    c = cfg("sigmoid_grouped_topk", e=8, k=2, n_group=1, topk_group=1, renormalize=False)
    logits = torch.randn(16, 8, generator=generator)
    bias = torch.zeros(8)
    bias[6] = 10.0  # expert 6 wins every choice whatever its score
    w, ids = route(logits, c, correction_bias=bias)
    assert (ids[:, 0] == 6).all()
    # the weight is the unbiased sigmoid score of the chosen expert
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids.long()))
    w0, ids0 = route(logits, c)
    assert not torch.equal(ids0, ids)


@pytest.mark.parametrize("routing", ["sigmoid_grouped_topk", "softmax_grouped_topk"])
def test_grouped_topk_picks_only_from_the_best_groups(routing, generator):
    c = cfg(routing, e=32, k=4, n_group=8, topk_group=2)
    logits = torch.randn(64, 32, generator=generator) * 3
    _, ids = route(logits, c)
    groups = ids.long() // 4
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    # plain top-k over all 32 experts would have left those groups for most tokens
    _, flat_ids = route(logits, cfg("softmax_topk", e=32, k=4))
    assert sum(len(set(row)) > 2 for row in (flat_ids.long() // 4).tolist()) > 0
    # the groups kept are the best by the group score
    _, ref_ids = reference_route(logits, c)
    assert torch.equal(ids.long(), ref_ids)


def test_router_logits_computes_in_float32_and_keeps_float64(generator):
    x = torch.randn(3, 16, generator=generator)
    weight = torch.randn(8, 16, generator=generator)
    bias = torch.randn(8, generator=generator)
    out = router_logits(x.half(), weight.half(), bias.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.half().float() @ weight.half().float().t() + bias.half().float())
    assert router_logits(x.double(), weight.double()).dtype == torch.float64


# ------------------------------------------------------------------------------------------ bad input
def test_bad_logits_shape_names_the_argument():
    c = cfg()
    with pytest.raises(ValueError, match=r"router_logits: expected shape \[T, 8\], got \[4, 7\]"):
        route(torch.zeros(4, 7), c)
    with pytest.raises(ValueError, match=r"router_logits: expected shape \[T, 8\], got \[8\]"):
        route(torch.zeros(8), c)


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="router_logits: expected a floating dtype, got torch.int64"):
        route(torch.zeros(2, 8, dtype=torch.long), cfg())


def test_choice_scores_move_the_bias_to_the_scores():
    """choice_scores: sigmoid or softmax by the routing; the bias, float32 here, joins float64 scores in their dtype
    and moves only the choice."""
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 3.0, 0.0, 0.0])
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8, routing="sigmoid_grouped_topk",
                       n_group=2, topk_group=1)  # fmt: skip
    scores, choice = choice_scores(logits, config, bias)
    assert torch.equal(scores, torch.sigmoid(logits)) and choice.dtype == torch.float64
    assert torch.equal(choice, scores + bias.double())
    softmax = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8, routing="softmax_topk")
    scores, choice = choice_scores(logits, softmax)
    assert torch.equal(scores, logits.softmax(-1)) and choice is scores
    with pytest.raises(ValueError, match=r"correction_bias: expected shape \[4\], got \[3\]"):
        choice_scores(logits, config, bias[:3])


def test_bad_correction_bias_shape():
    with pytest.raises(ValueError, match=r"correction_bias: expected shape \[8\], got \[4\]"):
        route(torch.zeros(2, 8), cfg("sigmoid_grouped_topk"), correction_bias=torch.zeros(4))


def test_top_k_above_num_experts_rejected():
    with pytest.raises(ValueError, match=r"MoEConfig.top_k: expected top_k <= num_experts \(4\), got 5"):
        cfg(e=4, k=5)


def test_grouped_config_errors_name_the_field():
    with pytest.raises(ValueError, match="MoEConfig.n_group"):
        cfg("sigmoid_grouped_topk", e=8, n_group=3)
    with pytest.raises(ValueError, match="MoEConfig.topk_group"):
        cfg("sigmoid_grouped_topk", e=8, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="MoEConfig.topk_group"):
        cfg("sigmoid_grouped_topk", e=8, k=4, n_group=4, topk_group=1)


# ------------------------------------------------------------------------- parity with transformers
H = 32


def _hf_case(family: str):
    """(HF config, HF router module) for one family at tiny size."""
    transformers = pytest.importorskip("transformers")
    import transformers.models as m

    small = {"hidden_size": H, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    if family == "mixtral":
        config = transformers.MixtralConfig(**small, num_local_experts=8, num_experts_per_tok=2)
        router = m.mixtral.modeling_mixtral.MixtralTopKRouter(config)
    elif family in ("qwen2_moe", "qwen2_moe_norm"):
        config = transformers.Qwen2MoeConfig(
            **small,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_experts=12,
            num_experts_per_tok=4,
            norm_topk_prob=family.endswith("norm"),
        )
        router = m.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **small, moe_intermediate_size=8, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True
        )
        router = m.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**small, num_experts=16, num_experts_per_tok=4)
        router = m.olmoe.modeling_olmoe.OlmoeTopKRouter(config)
    elif family in ("deepseek_v2", "deepseek_v2_grouped"):
        grouped = family.endswith("grouped")
        config = transformers.DeepseekV2Config(
            **small,
            moe_intermediate_size=8,
            n_routed_experts=16,
            num_experts_per_tok=3,
            n_shared_experts=2,
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=4 if grouped else None,
            topk_group=2 if grouped else None,
            routed_scaling_factor=16.0 if grouped else 1.0,
            norm_topk_prob=False,
        )
        router = m.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(config)
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **small,
            moe_intermediate_size=8,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=8,
            topk_group=3,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=0,
        )
        router = m.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    elif family == "glm4_moe":
        config = transformers.Glm4MoeConfig(
            **small,
            moe_intermediate_size=8,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
        )
        router = m.glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter(config)
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(**small, num_local_experts=16, num_experts_per_tok=4)
        router = m.gpt_oss.modeling_gpt_oss.GptOssTopKRouter(config)
    elif family == "granitemoe":
        config = transformers.GraniteMoeConfig(**small, num_local_experts=10, num_experts_per_tok=3)
        router = m.granitemoe.modeling_granitemoe.GraniteMoeTopKRouter(config)
    elif family == "llama4":
        config = transformers.Llama4TextConfig(**small, num_local_experts=8, num_experts_per_tok=1)
        router = m.llama4.modeling_llama4.Llama4Router(config)
    else:  # pragma: no cover
        raise AssertionError(family)
    return config, router


HF_FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen2_moe_norm",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v2_grouped",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "llama4",
]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_route_matches_transformers_router(family, generator):
    hf_config, router = _hf_case(family)
    config = config_from_hf_dict(hf_config.to_dict())
    e = config.num_experts
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, H, generator=generator))
        bias = getattr(router, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            assert config.router_bias
            bias.copy_(torch.randn(e, generator=generator))
        correction = getattr(router, "e_score_correction_bias", None)
        if correction is not None:
            assert config.score_correction_bias
            correction.copy_(torch.randn(e, generator=generator) * 0.1)
    x = torch.randn(48, H, generator=generator)

    with torch.no_grad():
        out = router(x)
    if family == "llama4":  # (scores [T, E] with 0 for experts not picked, logits)
        hf_scores = out[0]
        hf_ids = hf_scores.topk(config.top_k, dim=-1).indices
        hf_w = hf_scores.gather(1, hf_ids)
    else:
        _, hf_w, hf_ids = out

    logits = router_logits(x, router.weight, bias if isinstance(bias, torch.nn.Parameter) else None)
    w, ids = route(logits, config, correction_bias=correction)
    w, ids = by_id(w, ids)
    hf_w, hf_ids = by_id(hf_w, hf_ids)
    assert torch.equal(ids, hf_ids), f"{family}: ids differ"
    torch.testing.assert_close(w, hf_w, atol=1e-5, rtol=1e-5)
