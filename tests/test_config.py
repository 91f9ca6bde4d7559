"""MoEConfig: validation, presets, config.json parsing of each family, from_pretrained, cost formulas."""

from __future__ import annotations

import json

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.hf_config import config_from_hf_dict, list_presets, load_config, load_preset

REQUIRED_PRESETS = [
    "mixtral-8x7b",
    "mixtral-8x22b",
    "qwen1.5-moe-a2.7b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "deepseek-v2-lite",
    "deepseek-v3",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "llama4-scout",
    "llama4-maverick",
    "olmoe-1b-7b",
]

# (E, K, H, I) from each model's published config.json
KNOWN_SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen1.5-moe-a2.7b": (60, 4, 2048, 1408),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "deepseek-v3": (256, 8, 7168, 2048),
    "gpt-oss-20b": (32, 4, 2880, 2880),
    "gpt-oss-120b": (128, 4, 2880, 2880),
    "llama4-scout": (16, 1, 5120, 8192),
    "llama4-maverick": (128, 1, 5120, 8192),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
}


def small(**kw) -> MoEConfig:
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 16, "intermediate_size": 8}
    return MoEConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- presets
def test_required_presets_are_shipped():
    assert set(REQUIRED_PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_through_the_config_json_path(name):
    config = load_preset(name)
    assert config.name == name
    assert config.extra["source"].count("/") == 1  # the HF repo the numbers come from
    assert config.flops_per_token() > 0 and config.weight_bytes_per_token() > 0


@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
def test_known_preset_shapes(name):
    c = MoEConfig.from_pretrained(name)
    assert (c.num_experts, c.top_k, c.hidden_size, c.intermediate_size) == KNOWN_SHAPES[name]


def test_preset_semantics():
    v3 = load_config("deepseek-v3")
    assert (v3.routing, v3.n_group, v3.topk_group, v3.score_correction_bias) == ("sigmoid_grouped_topk", 8, 4, True)
    assert v3.routed_scaling_factor == 2.5 and v3.renormalize
    assert (v3.num_shared_experts, v3.shared_intermediate_size) == (1, 2048)
    assert v3.extra["num_moe_layers"] == 58  # 61 layers, the first 3 dense

    lite = load_config("deepseek-v2-lite")
    assert (lite.routing, lite.renormalize, lite.shared_intermediate_size) == ("softmax_topk", False, 2 * 1408)

    qwen15 = load_config("qwen1.5-moe-a2.7b")
    assert qwen15.shared_expert_gate and qwen15.shared_intermediate_size == 5632 and not qwen15.renormalize
    assert load_config("qwen3-30b-a3b").renormalize

    oss = load_config("gpt-oss-120b")
    assert (oss.activation, oss.swiglu_alpha, oss.swiglu_limit) == ("swigluoai", 1.702, 7.0)
    assert oss.expert_bias and oss.router_bias and oss.routing == "topk_softmax"

    maverick = load_config("llama4-maverick")
    assert maverick.routing == "sigmoid_top1_input_scaled" and maverick.weights_on_input
    assert (maverick.num_shared_experts, maverick.shared_intermediate_size) == (1, 8192)
    assert maverick.extra["num_moe_layers"] == 24  # interleave_moe_layer_step 2 over 48 layers
    assert load_config("llama4-scout").extra["num_moe_layers"] == 48

    mixtral = load_config("mixtral-8x7b")
    assert mixtral.routing == "softmax_topk" and mixtral.renormalize and not mixtral.has_shared_experts


def test_preset_names_are_case_insensitive():
    assert load_config("Mixtral-8x7B") == load_config("mixtral-8x7b")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="preset: expected one of .*'mixtral-8x7b'.*got 'nope'"):
        load_preset("nope")
    with pytest.raises(ValueError, match=r"name_or_path: expected a preset \(.*qwen3-30b-a3b.*got 'nope'"):
        load_config("nope")


# ------------------------------------------------------------------------------ config.json and dirs
MIXTRAL_JSON = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "num_hidden_layers": 3,
}


def test_config_json_path_and_directory(tmp_path):
    model_dir = tmp_path / "tiny-mixtral"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MIXTRAL_JSON))
    from_file = load_config(model_dir / "config.json")
    from_dir = MoEConfig.from_pretrained(str(model_dir))
    assert from_file == from_dir
    assert (from_dir.num_experts, from_dir.top_k, from_dir.hidden_size, from_dir.intermediate_size) == (4, 2, 64, 96)
    assert from_dir.name == "tiny-mixtral"
    assert from_dir.extra["num_hidden_layers"] == 3


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_config(tmp_path)


def test_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_config(path)


@pytest.mark.parametrize(
    "d, key, tried, model_type",
    [
        ({"model_type": "mixtral", "hidden_size": 8}, "num_local_experts", "num_local_experts, num_experts", "mixtral"),
        (
            {"model_type": "gpt_oss", "hidden_size": 8, "intermediate_size": 8, "num_local_experts": 4},
            "num_experts_per_tok",
            "num_experts_per_tok, experts_per_token",
            "gpt_oss",
        ),
        (
            {"model_type": "qwen3_moe", "hidden_size": 8, "num_experts": 4, "num_experts_per_tok": 2},
            "moe_intermediate_size",
            None,
            "qwen3_moe",
        ),
        # a dense model: no expert count under any name tilemoe knows
        ({"model_type": "llama", "hidden_size": 8, "intermediate_size": 8}, "num_local_experts", None, "llama"),
        ({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"]}, "text_config", None, "llama4"),
    ],
)
def test_missing_key_is_named(d, key, tried, model_type):
    with pytest.raises(ValueError, match=f"no key '{key}'") as info:
        config_from_hf_dict(d)
    assert f"model_type '{model_type}'" in str(info.value)
    if tried:
        assert f"(tried {tried})" in str(info.value)


def test_missing_key_in_a_config_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "olmoe", "hidden_size": 8}))
    with pytest.raises(ValueError, match=f"{path}: no key 'num_experts'"):
        load_config(path)


def test_unknown_model_type_with_moe_keys_warns_and_assumes_softmax_topk():
    d = {"model_type": "somemoe", "hidden_size": 8, "intermediate_size": 4, "num_experts": 4, "num_experts_per_tok": 2}
    with pytest.warns(UserWarning, match="'somemoe' is not one tilemoe knows"):
        c = config_from_hf_dict(d)
    assert (c.routing, c.num_experts, c.top_k) == ("softmax_topk", 4, 2)


def test_family_from_architectures_when_model_type_is_missing():
    d = {k: v for k, v in MIXTRAL_JSON.items() if k != "model_type"}
    assert config_from_hf_dict(d).extra["family"] == "mixtral"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="key 'hidden_act' expected one of .* got 'tanh'"):
        config_from_hf_dict({**MIXTRAL_JSON, "hidden_act": "tanh"})
    with pytest.raises(ValueError, match="key 'hidden_size' expected an int, got '64'"):
        config_from_hf_dict({**MIXTRAL_JSON, "hidden_size": "64"})
    v2 = json.loads(json.dumps(load_preset_dict("deepseek-v2-lite")))
    with pytest.raises(ValueError, match="key 'topk_method' expected 'greedy' or 'group_limited_greedy'"):
        config_from_hf_dict({**v2, "topk_method": "noaux_tc"})
    v3 = load_preset_dict("deepseek-v3")
    with pytest.raises(ValueError, match="key 'scoring_func' expected 'sigmoid', got 'softmax'"):
        config_from_hf_dict({**v3, "scoring_func": "softmax"})
    with pytest.raises(TypeError, match="config_from_hf_dict: expected a dict, got list"):
        config_from_hf_dict([])


def load_preset_dict(name: str) -> dict:
    from importlib import resources

    return json.loads((resources.files("tilemoe") / "presets" / f"{name}.json").read_text())


def test_activation_names_map():
    assert config_from_hf_dict({**MIXTRAL_JSON, "hidden_act": "gelu_pytorch_tanh"}).activation == "gelu_tanh"
    assert config_from_hf_dict({**MIXTRAL_JSON, "hidden_act": "gelu"}).activation == "gelu"
    assert config_from_hf_dict({**MIXTRAL_JSON, "hidden_act": "relu"}).activation == "relu"


# ------------------------------------------------------------------------------------- HF model ids
def test_hf_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="local HF cache \\(HF_HUB_OFFLINE is set\\)") as info:
        load_config("tilemoe-test/no-such-model")
    assert "'tilemoe-test/no-such-model' is not a preset" in str(info.value)


def test_hf_id_offline_uses_local_files_only(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MIXTRAL_JSON))
    calls = []

    def fake_download(repo_id, filename, local_files_only=False):
        calls.append((repo_id, filename, local_files_only))
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = load_config("someorg/tiny-mixtral")
    assert calls == [("someorg/tiny-mixtral", "config.json", True)]
    assert (c.name, c.num_experts) == ("someorg/tiny-mixtral", 4)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    load_config("someorg/tiny-mixtral")
    assert calls[-1] == ("someorg/tiny-mixtral", "config.json", False)


def test_hf_id_download_failure_is_reported(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def failing(repo_id, filename, local_files_only=False):
        raise OSError("no network")

    monkeypatch.setattr(hub, "hf_hub_download", failing)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="could not be read from the Hugging Face hub: OSError: no network"):
        load_config("someorg/missing")


# ---------------------------------------------------------------- every family from its HF config class
def test_hf_config_classes_map_field_by_field():
    transformers = pytest.importorskip("transformers")
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}

    c = config_from_hf_dict(transformers.Qwen2MoeConfig(**tiny, moe_intermediate_size=8, num_experts=6).to_dict())
    assert (c.num_experts, c.intermediate_size, c.shared_intermediate_size, c.shared_expert_gate) == (6, 8, 5632, True)

    d = transformers.DeepseekV2Config(
        **tiny, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=3
    ).to_dict()
    c = config_from_hf_dict(d)
    assert (c.num_shared_experts, c.shared_intermediate_size, c.routing) == (3, 24, "softmax_topk")

    d = transformers.GptOssConfig(**tiny, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=5.0).to_dict()
    c = config_from_hf_dict(d)
    assert (c.num_experts, c.top_k, c.intermediate_size, c.swiglu_limit) == (4, 2, 48, 5.0)

    text = {**tiny, "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2}
    full = transformers.Llama4Config(text_config=text).to_dict()
    c = config_from_hf_dict(full)
    assert c == config_from_hf_dict(transformers.Llama4TextConfig(**text).to_dict())
    assert (c.num_experts, c.intermediate_size, c.shared_intermediate_size) == (4, 48, 48)
    assert c.extra["num_moe_layers"] == 1

    d = transformers.GraniteMoeSharedConfig(**tiny, num_local_experts=4, shared_intermediate_size=20).to_dict()
    c = config_from_hf_dict(d)
    assert (c.routing, c.num_shared_experts, c.shared_intermediate_size) == ("topk_softmax", 1, 20)
    assert not config_from_hf_dict(transformers.GraniteMoeConfig(**tiny).to_dict()).has_shared_experts

    d = transformers.Qwen3MoeConfig(**tiny, moe_intermediate_size=8, mlp_only_layers=[0]).to_dict()
    assert config_from_hf_dict(d).extra["num_moe_layers"] == 1


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_experts": 0}, r"MoEConfig.num_experts: expected a positive int, got 0"),
        ({"hidden_size": 16.0}, r"MoEConfig.hidden_size: expected a positive int, got 16.0"),
        ({"top_k": True}, r"MoEConfig.top_k: expected a positive int, got True"),
        ({"top_k": 9}, r"MoEConfig.top_k: expected top_k <= num_experts \(8\), got 9"),
        ({"activation": "tanh"}, r"MoEConfig.activation: expected one of .*, got 'tanh'"),
        ({"activation": "swigluoai", "gated": False}, r"MoEConfig.activation: 'swigluoai' needs gated=True"),
        ({"routing": "argmax"}, r"MoEConfig.routing: expected one of .*, got 'argmax'"),
        ({"routing": "sigmoid_grouped_topk", "n_group": 3}, r"MoEConfig.n_group: expected a divisor of num_experts"),
        ({"num_shared_experts": -1}, r"MoEConfig.num_shared_experts: expected >= 0, got -1"),
        ({"num_shared_experts": 1}, r"MoEConfig.shared_intermediate_size: expected > 0 .*got 0"),
    ],
)
def test_validation_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        small(**changes)


def test_from_dict_round_trip_and_unknown_keys():
    c = small(routing="sigmoid_grouped_topk", n_group=2, topk_group=1, num_shared_experts=1, shared_intermediate_size=4)
    assert MoEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"MoEConfig.from_dict: unknown keys \['bogus'\]"):
        MoEConfig.from_dict({**c.to_dict(), "bogus": 1})


# ------------------------------------------------------------------------------------- cost formulas
def test_flops_and_bytes_by_hand():
    c = load_config("mixtral-8x7b")
    h, i = 4096, 14336
    assert c.flops_per_token() == 2 * 2 * (h * 2 * i + i * h) + 2 * h * 8
    assert c.weight_bytes_per_token() == 2 * (2 * (h * 2 * i + i * h) + h * 8)
    q = load_config("qwen1.5-moe-a2.7b")
    h, i, si = 2048, 1408, 5632
    assert q.flops_per_token() == 2 * 4 * 3 * h * i + 2 * 3 * h * si + 2 * h + 2 * h * 60
    assert q.weight_bytes_per_token(1) == 4 * 3 * h * i + 3 * h * si + h + h * 60


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b", "gpt-oss-20b", "llama4-scout", "deepseek-v3"])
def test_flops_and_bytes_match_a_counted_forward(name):
    """FLOPs counted by torch on one token through the MoE module, and the bytes of the weights it used."""
    from torch.utils.flop_counter import FlopCounterMode

    from tilemoe.module import MoE

    real = load_config(name)
    # same structure, small sizes (routing groups and shared widths kept proportional)
    e = real.num_experts if real.num_experts <= 32 else 32
    kw = {"num_experts": e, "hidden_size": 24, "intermediate_size": 10}
    if real.has_shared_experts:
        kw["shared_intermediate_size"] = 10 * real.num_shared_experts
    c = real.replace(**kw)
    module = MoE(c, dtype=torch.float32, impl="reference")
    x = torch.randn(1, 24)
    with FlopCounterMode(display=False) as counter:
        module(x)
    assert counter.get_total_flops() == c.flops_per_token()

    with torch.no_grad():
        _, _, ids = module.route(x)
    used = 0
    for pname, p in module.named_parameters():
        if pname in ("w13", "w2", "b13", "b2"):
            used += sum(p[j].numel() for j in ids[0].tolist())
        else:
            used += p.numel()
    assert c.weight_bytes_per_token(4) == 4 * used


# Keys of the original (remote-code) configs that transformers' classes do not declare; tilemoe reads them.
REMOTE_CODE_KEYS = {"scoring_func", "topk_method", "moe_layer_freq", "experts_per_token"}
# model_type without a transformers class -> the class its architectures entry loads
CONFIG_CLASS_OF = {"kimi_k2": "deepseek_v3"}


@pytest.mark.parametrize("name", list_presets())
def test_presets_use_real_keys_and_round_trip_through_transformers(name):
    """Every preset key is one the model's transformers config class declares or aliases (attribute_map), or a
    known remote-code key,
    and the preset parsed from that class's to_dict() equals the preset parsed directly."""
    pytest.importorskip("transformers")
    from transformers import CONFIG_MAPPING

    d = load_preset_dict(name)
    fields = {k: v for k, v in d.items() if not k.startswith("_")}
    model_type = CONFIG_CLASS_OF.get(d["model_type"], d["model_type"])
    if model_type == "llama4":
        text = fields["text_config"]
        cls = CONFIG_MAPPING["llama4_text"]
        unknown = set(text) - set(cls().to_dict()) - set(cls.attribute_map) - REMOTE_CODE_KEYS
        hf = CONFIG_MAPPING["llama4"](text_config=text)
    else:
        cls = CONFIG_MAPPING[model_type]
        unknown = set(fields) - set(cls().to_dict()) - set(cls.attribute_map) - REMOTE_CODE_KEYS
        hf = cls(**{k: v for k, v in fields.items() if k != "model_type"})
    assert not unknown, f"{name}: keys {sorted(unknown)} are not {cls.__name__} keys"
    via_hf = config_from_hf_dict({**hf.to_dict(), **{k: v for k, v in fields.items() if k in REMOTE_CODE_KEYS}})
    assert via_hf == load_preset(name).replace(name=None)
