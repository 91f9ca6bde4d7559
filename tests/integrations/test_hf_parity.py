"""tilemoe against transformers' own MoE modules, built offline from tiny random configs (no downloads).

(a) ``from_hf_block(block, impl="reference")`` gives the block's output, (b) it shares the storage the module
docstring promises, (c) after ``register()``, ``experts_implementation="tilemoe"`` gives eager's output for the
block and for whole tiny Qwen3-MoE and Mixtral models.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "ExpertsInterface"):
    pytest.skip("transformers without ExpertsInterface (< 5): these modules differ", allow_module_level=True)

from tilemoe import convert, from_hf  # noqa: E402
from tilemoe.integrations import hf  # noqa: E402
from tilemoe.testing import assert_close  # noqa: E402

H = 32  # hidden; experts and intermediate sizes below are all different so a swapped axis fails on shape


@dataclass
class Family:
    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    block: str
    config: str
    kwargs: dict[str, Any]
    shares_experts: bool = True  # w13 / w2 are the block's own Parameters
    on_interface: bool = True  # experts decorated with @use_experts_implementation
    needs_config: bool = False  # the block keeps no config

    def build(self, seed: int) -> tuple[torch.nn.Module, Any]:
        mod = __import__(f"transformers.models.{self.module}.modeling_{self.module}", fromlist=[self.block])
        cfg = getattr(transformers, self.config)(hidden_size=H, experts_implementation="eager", **self.kwargs)
        torch.manual_seed(seed)
        block = getattr(mod, self.block)(cfg).float().eval()
        with torch.no_grad():
            # weights ~ N(0, scale): large enough that gpt-oss's clamp at swiglu_limit and the routers' ties
            # between groups are reached, random biases where the family has them
            for name, p in block.named_parameters():
                p.normal_(0.0, 0.5 if "bias" in name else 0.35)
            for name, b in block.named_buffers():
                if "correction_bias" in name:
                    b.normal_(0.0, 0.3)
        return block, cfg


FAMILIES = [
    # Mixtral: softmax top-2, always renormalised
    Family("mixtral", "mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
           {"intermediate_size": 24, "num_local_experts": 6, "num_experts_per_tok": 2}),
    # Qwen2-MoE: no renormalisation, shared expert with a sigmoid gate
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
           {"moe_intermediate_size": 24, "shared_expert_intermediate_size": 40, "num_experts": 6,
            "num_experts_per_tok": 2, "norm_topk_prob": False}),
    # Qwen3-MoE: renormalised top-k
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
           {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    # OLMoE: top-k of 7 (not a power of two), no renormalisation
    Family("olmoe", "olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig",
           {"intermediate_size": 24, "num_experts": 7, "num_experts_per_tok": 3, "norm_topk_prob": False}),
    # DeepSeek-V2: group-limited greedy softmax, routed scaling, 2 shared experts (Is = 2 * I)
    Family("deepseek_v2", "deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config",
           {"moe_intermediate_size": 24, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
            "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
            "norm_topk_prob": True}),  # transformers ignores it: tilemoe must too
    # DeepSeek-V3: sigmoid, grouped top-k with correction bias, renormalised then scaled, 1 shared expert
    Family("deepseek_v3", "deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
           {"moe_intermediate_size": 24, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 1,
            "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    # gpt-oss: router bias, expert biases, transposed + interleaved gate/up, swigluoai (copied, not shared)
    Family("gpt_oss", "gpt_oss", "GptOssMLP", "GptOssConfig",
           {"intermediate_size": 24, "num_local_experts": 6, "num_experts_per_tok": 2, "swiglu_limit": 1.5},
           shares_experts=False),
    # Llama-4: top-1 sigmoid weight on the expert input, transposed experts, ungated shared expert
    Family("llama4", "llama4", "Llama4TextMoe", "Llama4TextConfig",
           {"intermediate_size": 24, "num_local_experts": 5, "num_experts_per_tok": 1},
           shares_experts=False, on_interface=False, needs_config=True),
    # GraniteMoE: top-k on logits then softmax
    Family("granitemoe", "granitemoe", "GraniteMoeMoE", "GraniteMoeConfig",
           {"intermediate_size": 24, "num_local_experts": 6, "num_experts_per_tok": 2}),
    # GraniteMoeShared: the block holds the routed experts only (shared MLP is in the decoder layer)
    Family("granitemoeshared", "granitemoeshared", "GraniteMoeSharedMoE", "GraniteMoeSharedConfig",
           {"intermediate_size": 24, "shared_intermediate_size": 16, "num_local_experts": 6,
            "num_experts_per_tok": 2}),
]  # fmt: skip
IDS = [f.name for f in FAMILIES]
ON_INTERFACE = [f for f in FAMILIES if f.on_interface]  # Llama-4's experts are not on transformers' interface


def _out(y):
    return y[0] if isinstance(y, tuple) else y  # gpt-oss / Llama-4 blocks also return router scores / logits


def _input(seed: int, shape=(2, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, H, generator=g)


@pytest.fixture
def registered():
    hf.register(impl="reference")
    yield
    hf.unregister()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_reference_matches_block(family):
    block, cfg = family.build(seed=1)
    moe = from_hf(block, impl="reference", **({"config": cfg} if family.needs_config else {}))
    for shape in [(2, 7), (1, 1), (1, 0)]:  # a batch, one token, no tokens
        x = _input(2, shape)
        with torch.no_grad():
            ref = _out(block(x)).reshape(x.shape)
            out = moe(x)
        assert out.shape == x.shape
        assert_close(out, ref, torch.float32, name=f"{family.name} {list(shape)}")
    if family.name == "gpt_oss":  # the swiglu clamp was reached, so its limit is tested
        h = torch.einsum("th,ehi->tei", _input(2).reshape(-1, H), block.experts.gate_up_proj)
        assert (h.abs() > cfg.swiglu_limit).any()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_from_hf_shares_storage(family):
    block, cfg = family.build(seed=3)
    moe = from_hf(block, impl="reference", **({"config": cfg} if family.needs_config else {}))
    router = getattr(block, "gate", None) or block.router
    assert moe.router_weight.data_ptr() == router.weight.data_ptr()
    experts = block.experts
    shared = moe.w13.data_ptr() == experts.gate_up_proj.data_ptr() and moe.w2.data_ptr() == experts.down_proj.data_ptr()
    assert shared == family.shares_experts
    if family.shares_experts:  # an in-place update of the block reaches the tilemoe module
        assert moe.w13 is experts.gate_up_proj and moe.w2 is experts.down_proj
    if family.name == "gpt_oss":
        assert moe.router_bias.data_ptr() == router.bias.data_ptr()
        assert moe.b2.data_ptr() == experts.down_proj_bias.data_ptr()
        assert moe.b13.data_ptr() != experts.gate_up_proj_bias.data_ptr()  # interleaved: a copy
    if family.name == "deepseek_v3":
        assert moe.correction_bias.data_ptr() == router.e_score_correction_bias.data_ptr()
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if mlp is not None:
        assert moe.shared_w2.data_ptr() == mlp.down_proj.weight.data_ptr()
    if family.name == "qwen2_moe":
        assert moe.shared_gate.data_ptr() == block.shared_expert_gate.weight.data_ptr()
    if family.name == "granitemoeshared":
        assert moe.shared_w13 is None  # not in the block
    assert not any(t.is_meta for t in [*moe.parameters(), *moe.buffers()])
    assert all(p.requires_grad for p in moe.parameters())  # copies train like the block's tensors


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.on_interface], ids=[f.name for f in FAMILIES if f.on_interface]
)
def test_experts_interface_matches_eager(family, impl):
    block, cfg = family.build(seed=4)
    x = _input(5)
    with torch.no_grad():
        eager = _out(block(x))
        hf.register(impl=impl)
        try:
            cfg._experts_implementation = "tilemoe"
            ours = _out(block(x))
            assert "_tilemoe_cache" in block.experts.__dict__  # the call did go through tilemoe
            again = _out(block(x))  # second call goes through the cached converted weights
        finally:
            cfg._experts_implementation = "eager"
            hf.unregister()
    assert_close(ours, eager, torch.float32, name=f"{family.name} via experts_implementation='tilemoe' ({impl})")
    assert torch.equal(ours, again)


def test_experts_interface_sees_weight_updates(registered):
    """Converted (gpt-oss) weights are cached; an in-place change of the block's weights must invalidate them."""
    family = next(f for f in FAMILIES if f.name == "gpt_oss")
    block, cfg = family.build(seed=6)
    x = _input(7)
    cfg._experts_implementation = "tilemoe"
    with torch.no_grad():
        block(x)
        block.experts.gate_up_proj.mul_(0.5)
        ours = _out(block(x))
        cfg._experts_implementation = "eager"
        eager = _out(block(x))
    assert_close(ours, eager, torch.float32)


def _tiny_model(kind: str):
    common = {
        "vocab_size": 97, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=8, intermediate_size=40, moe_intermediate_size=24, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        )  # fmt: skip
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(11)
    return transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").float().eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_whole_model_logits_match_eager(kind, registered):
    model = _tiny_model(kind)
    with torch.no_grad():  # default init leaves routers at zero for some families: make routing non-trivial
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        eager = model(ids).logits
        if kind == "mixtral":
            assert hf.patch_model(model, impl="auto") is model
        else:
            model.set_experts_implementation("tilemoe")
        assert model.config._experts_implementation == "tilemoe"
        ours = model(ids).logits
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert len(experts) == 2 and all("_tilemoe_cache" in m.__dict__ for m in experts)
    assert_close(ours, eager, torch.float32, name=f"{kind} logits")
    assert not torch.equal(eager[0, 0], eager[0, 1])  # the logits carry signal, not a constant


def test_from_config_with_tilemoe(registered):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=50, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="tilemoe")
    assert model.config._experts_implementation == "tilemoe"


def test_register_is_idempotent_and_not_an_import_side_effect():
    code = (
        "import tilemoe, tilemoe.integrations.hf as hf\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as F\n"
        "assert 'tilemoe' not in F, 'registered at import'\n"
        "assert hf.register() == 'tilemoe' and hf.register(impl='reference') == 'tilemoe'\n"
        "assert F['tilemoe'].tilemoe_impl == 'reference'\n"
        "hf.unregister(); assert 'tilemoe' not in F\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_block_and_missing_config():
    with pytest.raises(TypeError, match="block"):
        from_hf(torch.nn.Linear(4, 4))
    family = next(f for f in FAMILIES if f.name == "llama4")
    block, _ = family.build(seed=0)
    with pytest.raises(ValueError, match="config"):
        from_hf(block)
    with pytest.raises(TypeError, match="model"):
        hf.patch_model(block)


def test_config_that_disagrees_with_weights():
    family = FAMILIES[0]
    block, cfg = family.build(seed=0)
    moe_cfg = from_hf(block).config.replace(intermediate_size=25)
    with pytest.raises(ValueError, match="config"):
        from_hf(block, config=moe_cfg)


def test_ungated_experts_through_interface():
    """has_gate=False experts (NemotronH: up_proj then act): tilemoe's plain MLP; an unknown activation raises."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    kw = {"hidden_size": H, "moe_intermediate_size": 24, "n_routed_experts": 5, "num_experts_per_tok": 2}
    cfg = transformers.NemotronHConfig(**kw, mlp_hidden_act="relu", experts_implementation="eager")
    torch.manual_seed(8)
    experts = NemotronHExperts(cfg).float()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.35)
    x = _input(9).reshape(-1, H)
    g = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(x.shape[0])])
    weights = torch.rand(x.shape[0], 2, generator=g)
    with torch.no_grad():
        assert_close(hf.hf_experts_forward(experts, x, ids, weights, impl="reference"), experts(x, ids, weights))
    relu2 = NemotronHExperts(transformers.NemotronHConfig(**kw, mlp_hidden_act="relu2"))
    with pytest.raises(NotImplementedError, match="activation"):
        hf.hf_experts_forward(relu2, x, ids, weights)


class _OldMixtralMLP(torch.nn.Module):
    """One expert as transformers 4.x Mixtral stored it (MixtralBlockSparseTop2MLP)."""

    def __init__(self, w1, w3, w2):
        super().__init__()
        self.w1, self.w3, self.w2 = (torch.nn.Linear(t.shape[1], t.shape[0], bias=False) for t in (w1, w3, w2))
        with torch.no_grad():
            self.w1.weight.copy_(w1)
            self.w3.weight.copy_(w3)
            self.w2.weight.copy_(w2)


def test_transformers4_per_expert_block():
    """A 4.x-style block (router nn.Linear, experts a ModuleList of w1/w3/w2 MLPs) with the weights of a 5.x
    Mixtral block gives that block's output: the per-expert keys are stacked in the right order."""
    family = FAMILIES[0]
    block, cfg = family.build(seed=13)
    sd = convert.to_per_expert_state_dict(block.experts.gate_up_proj, block.experts.down_proj, "", names="mixtral")
    old = torch.nn.Module()
    old.gate = torch.nn.Linear(H, cfg.num_local_experts, bias=False)
    with torch.no_grad():
        old.gate.weight.copy_(block.gate.weight)
    old.experts = torch.nn.ModuleList(
        _OldMixtralMLP(sd[f"{e}.w1.weight"], sd[f"{e}.w3.weight"], sd[f"{e}.w2.weight"])
        for e in range(cfg.num_local_experts)
    )
    moe = from_hf(old, impl="reference", config=cfg)
    x = _input(14)
    with torch.no_grad():
        assert_close(moe(x), block(x), torch.float32)
    assert moe.router_weight is old.gate.weight
