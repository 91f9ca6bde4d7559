"""Read a transformers config.json (or a shipped preset) into a MoEConfig.

One path for both: every preset in ``tilemoe/presets/*.json`` holds the original config.json keys of a real
model and goes through ``config_from_hf_dict`` like any downloaded config.json.

Families and where their numbers come from (the transformers 5.x modeling code of each):

    mixtral            softmax over E, top-k, always renormalised
    qwen2_moe          softmax top-k, renormalise = norm_topk_prob; one shared expert with a sigmoid gate
    qwen3_moe          softmax top-k, renormalise = norm_topk_prob
    olmoe              softmax top-k, renormalise = norm_topk_prob
    deepseek_v2        softmax; topk_method greedy -> softmax_topk, group_limited_greedy -> softmax_grouped_topk;
                       routed_scaling_factor; n_shared_experts * moe_intermediate_size shared MLP
    deepseek_v3        sigmoid, grouped top-k with e_score_correction_bias, norm_topk_prob, routed_scaling_factor
    (kimi_k2, glm4_moe share the deepseek_v3 router)
    gpt_oss            top-k on logits then softmax; router and expert biases; swigluoai(alpha, limit)
    llama4(_text)      top-k logits, sigmoid weight scales the expert input; one shared expert (no gate)
    granitemoe(shared) top-k on logits then softmax; granitemoeshared adds a shared MLP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from tilemoe.config import MoEConfig

__all__ = ["config_from_hf_dict", "list_presets", "load_config", "load_preset", "read_config_json"]

_MISSING = object()

# transformers' hidden_act names -> tilemoe activations (ACT2FN: "gelu" is exact, the tanh forms are approximate)
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


class _Reader:
    """Key lookup in one config dict; a missing key raises a ValueError naming it and the model_type."""

    def __init__(self, d: dict, model_type: str, origin: str) -> None:
        self.d = d
        self.model_type = model_type
        self.origin = origin

    def get(self, *keys: str, default: Any = _MISSING) -> Any:
        for key in keys:
            value = self.d.get(key)
            if value is not None:
                return value
        if default is not _MISSING:
            return default
        tried = f" (tried {', '.join(keys)})" if len(keys) > 1 else ""
        raise ValueError(f"{self.origin}: no key {keys[0]!r}{tried} for model_type {self.model_type!r}")

    def int(self, *keys: str, default: Any = _MISSING) -> int:
        value = self.get(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.origin}: key {keys[0]!r} expected an int, got {value!r}")
        return value

    def activation(self) -> str:
        act = self.get("hidden_act", "hidden_activation", default="silu")
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"{self.origin}: key 'hidden_act' expected one of {sorted(_ACTIVATIONS)}, got {act!r} "
                f"for model_type {self.model_type!r}"
            )
        return _ACTIVATIONS[act]


def _extra(r: _Reader, num_moe_layers: int | None, **more: Any) -> dict:
    extra = {"model_type": r.model_type, "num_hidden_layers": r.d.get("num_hidden_layers")}
    if num_moe_layers is not None:
        extra["num_moe_layers"] = num_moe_layers
    extra.update({k: v for k, v in more.items() if v is not None})
    if "_source" in r.d:
        extra["source"] = r.d["_source"]
    if "_note" in r.d:
        extra["note"] = r.d["_note"]
    return extra


def _layers(r: _Reader) -> int | None:
    n = r.d.get("num_hidden_layers")
    return n if isinstance(n, int) else None


# ------------------------------------------------------------------------------------------- families
def _mixtral(r: _Reader) -> dict:
    return {
        "num_experts": r.int("num_local_experts", "num_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("intermediate_size"),
        "activation": r.activation(),
        "routing": "softmax_topk",
        "renormalize": True,  # MixtralTopKRouter always divides the top-k probabilities by their sum
        "extra": _extra(r, _layers(r)),
    }


def _qwen_moe_layers(r: _Reader) -> int | None:
    n = _layers(r)
    if n is None:
        return None
    step = r.d.get("decoder_sparse_step") or 1
    dense = set(r.d.get("mlp_only_layers") or [])
    return sum(1 for i in range(n) if i not in dense and (i + 1) % step == 0)


def _qwen2_moe(r: _Reader) -> dict:
    shared = r.int("shared_expert_intermediate_size", default=0)
    return {
        "num_experts": r.int("num_experts", "num_local_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("moe_intermediate_size"),
        "activation": r.activation(),
        "routing": "softmax_topk",
        "renormalize": bool(r.get("norm_topk_prob", default=False)),
        "num_shared_experts": 1 if shared else 0,
        "shared_intermediate_size": shared,
        "shared_expert_gate": bool(shared),  # Qwen2MoeSparseMoeBlock: sigmoid(shared_expert_gate(x)) * shared(x)
        "extra": _extra(r, _qwen_moe_layers(r)),
    }


def _qwen3_moe(r: _Reader) -> dict:
    return {
        "num_experts": r.int("num_experts", "num_local_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("moe_intermediate_size"),
        "activation": r.activation(),
        "routing": "softmax_topk",
        "renormalize": bool(r.get("norm_topk_prob", default=False)),
        "extra": _extra(r, _qwen_moe_layers(r)),
    }


def _olmoe(r: _Reader) -> dict:
    return {
        "num_experts": r.int("num_experts", "num_local_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("intermediate_size"),
        "activation": r.activation(),
        "routing": "softmax_topk",
        "renormalize": bool(r.get("norm_topk_prob", default=False)),
        "extra": _extra(r, _layers(r)),
    }


def _deepseek_moe_layers(r: _Reader) -> int | None:
    n = _layers(r)
    if n is None:
        return None
    first = r.d.get("first_k_dense_replace") or 0
    freq = r.d.get("moe_layer_freq") or 1
    return sum(1 for i in range(n) if i >= first and i % freq == 0)


def _deepseek_shared(r: _Reader, moe_i: int) -> dict:
    n_shared = r.int("n_shared_experts", default=0)
    return {"num_shared_experts": n_shared, "shared_intermediate_size": n_shared * moe_i}


def _deepseek_v2(r: _Reader) -> dict:
    """DeepSeek-V2 / V2-Lite. ``renormalize`` follows ``norm_topk_prob`` as DeepSeek's own code does (the
    transformers port never renormalises; every released V2 checkpoint has norm_topk_prob false)."""
    moe_i = r.int("moe_intermediate_size")
    method = r.get("topk_method", default="greedy")
    out = {
        "num_experts": r.int("n_routed_experts", "num_local_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": moe_i,
        "activation": r.activation(),
        "renormalize": bool(r.get("norm_topk_prob", default=False)),
        "routed_scaling_factor": float(r.get("routed_scaling_factor", default=1.0)),
        **_deepseek_shared(r, moe_i),
        "extra": _extra(
            r,
            _deepseek_moe_layers(r),
            topk_method=method,
            first_k_dense_replace=r.d.get("first_k_dense_replace"),
            dense_intermediate_size=r.d.get("intermediate_size"),
        ),
    }
    if method == "greedy":
        out["routing"] = "softmax_topk"
    elif method == "group_limited_greedy":
        out.update(routing="softmax_grouped_topk", n_group=r.int("n_group"), topk_group=r.int("topk_group"))
    else:
        raise ValueError(
            f"{r.origin}: key 'topk_method' expected 'greedy' or 'group_limited_greedy', got {method!r} "
            f"for model_type {r.model_type!r}"
        )
    return out


def _deepseek_v3(r: _Reader) -> dict:
    """DeepSeek-V3 and the models that reuse its router (Kimi-K2, GLM-4.5 ``glm4_moe``)."""
    scoring = r.get("scoring_func", default="sigmoid")
    method = r.get("topk_method", default="noaux_tc")
    if scoring != "sigmoid":
        raise ValueError(
            f"{r.origin}: key 'scoring_func' expected 'sigmoid', got {scoring!r} for model_type {r.model_type!r}"
        )
    if method != "noaux_tc":
        raise ValueError(
            f"{r.origin}: key 'topk_method' expected 'noaux_tc', got {method!r} for model_type {r.model_type!r}"
        )
    moe_i = r.int("moe_intermediate_size")
    return {
        "num_experts": r.int("n_routed_experts", "num_local_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": moe_i,
        "activation": r.activation(),
        "routing": "sigmoid_grouped_topk",
        "n_group": r.int("n_group", default=1),
        "topk_group": r.int("topk_group", default=1),
        "score_correction_bias": True,  # e_score_correction_bias: a buffer in every such router
        "renormalize": bool(r.get("norm_topk_prob", default=True)),
        "routed_scaling_factor": float(r.get("routed_scaling_factor", default=1.0)),
        **_deepseek_shared(r, moe_i),
        "extra": _extra(
            r,
            _deepseek_moe_layers(r),
            first_k_dense_replace=r.d.get("first_k_dense_replace"),
            dense_intermediate_size=r.d.get("intermediate_size"),
        ),
    }


def _gpt_oss(r: _Reader) -> dict:
    return {
        "num_experts": r.int("num_local_experts", "num_experts"),
        "top_k": r.int("num_experts_per_tok", "experts_per_token"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("intermediate_size"),
        "activation": "swigluoai",
        "swiglu_alpha": float(r.get("swiglu_alpha", default=1.702)),
        "swiglu_limit": float(r.get("swiglu_limit", default=7.0)),
        "expert_bias": True,
        "router_bias": True,
        "routing": "topk_softmax",
        "extra": _extra(r, _layers(r)),
    }


def _llama4(r: _Reader) -> dict:
    n = _layers(r)
    moe_layers = r.d.get("moe_layers")
    if moe_layers is None and n is not None:
        step = r.d.get("interleave_moe_layer_step") or 1
        moe_layers = list(range(step - 1, n, step))
    i = r.int("intermediate_size")
    return {
        "num_experts": r.int("num_local_experts", "num_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": i,
        "activation": r.activation(),
        "routing": "sigmoid_top1_input_scaled",
        "renormalize": False,
        "num_shared_experts": 1,  # Llama4TextMoe.shared_expert = Llama4TextMLP(config): width intermediate_size
        "shared_intermediate_size": i,
        "extra": _extra(
            r,
            None if moe_layers is None else len(moe_layers),
            interleave_moe_layer_step=r.d.get("interleave_moe_layer_step"),
            dense_intermediate_size=r.d.get("intermediate_size_mlp"),
        ),
    }


def _granitemoe(r: _Reader) -> dict:
    shared = r.int("shared_intermediate_size", default=0)
    return {
        "num_experts": r.int("num_local_experts", "num_experts"),
        "top_k": r.int("num_experts_per_tok"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("intermediate_size"),
        "activation": r.activation(),
        "routing": "topk_softmax",
        "num_shared_experts": 1 if shared else 0,
        "shared_intermediate_size": shared,
        "extra": _extra(r, _layers(r)),
    }


_FAMILIES: dict[str, Callable[[_Reader], dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "kimi_k2": _deepseek_v3,
    "glm4_moe": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "llama4_text": _llama4,
    "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoe,
}

# architectures[0] -> family, for a config.json whose model_type is missing or unknown
_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Llama4ForConditionalGeneration": "llama4",
    "Llama4ForCausalLM": "llama4_text",
    "GraniteMoeForCausalLM": "granitemoe",
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
}


def known_model_types() -> list[str]:
    """model_type values ``config_from_hf_dict`` maps (plus "llama4", read through its text_config)."""
    return sorted([*_FAMILIES, "llama4"])


def config_from_hf_dict(d: dict, name: str | None = None, *, origin: str = "config.json") -> MoEConfig:
    """Map a transformers config dict (config.json or ``PretrainedConfig.to_dict()``) to a MoEConfig.

    The family is picked by ``model_type``, else by ``architectures[0]``; Llama-4's multimodal config is read
    through its ``text_config``. Model facts that MoEConfig has no field for (layer counts, the dense MLP
    width, the source repo) go to ``MoEConfig.extra``.

    Raises:
        ValueError: a key the family needs is missing (the message names it, the keys tried and the
            model_type), a value is of an unknown kind, or the layout is not one tilemoe knows.
        TypeError: ``d`` is not a dict.
    """
    if not isinstance(d, dict):
        raise TypeError(f"config_from_hf_dict: expected a dict, got {type(d).__name__}")
    model_type = d.get("model_type")
    family = model_type if model_type in _FAMILIES or model_type == "llama4" else None
    if family is None:
        for arch in d.get("architectures") or []:
            if arch in _ARCHITECTURES:
                family = _ARCHITECTURES[arch]
                break
    if family == "llama4" or (family is None and isinstance(d.get("text_config"), dict)):
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{origin}: no key 'text_config' for model_type {model_type!r}")
        text = {**text}
        for key in ("_source", "_note"):
            if key in d:
                text.setdefault(key, d[key])
        if family is None and text.get("model_type") not in _FAMILIES:
            return _generic(text, name, origin)
        family = "llama4_text" if family == "llama4" else text.get("model_type")
        d = text
        model_type = d.get("model_type", model_type)
    if family is None:
        return _generic(d, name, origin)
    fields = _FAMILIES[family](_Reader(d, str(model_type or family), origin))
    fields["extra"]["family"] = family
    return MoEConfig(name=name, **fields)


def _generic(d: dict, name: str | None, origin: str) -> MoEConfig:
    """An unknown model_type: read the common MoE keys so a missing one gets named; assume softmax top-k."""
    r = _Reader(d, str(d.get("model_type")), origin)
    fields = {
        "num_experts": r.int("num_local_experts", "num_experts", "n_routed_experts"),
        "top_k": r.int("num_experts_per_tok", "experts_per_token", "moe_topk"),
        "hidden_size": r.int("hidden_size"),
        "intermediate_size": r.int("moe_intermediate_size", "intermediate_size"),
        "activation": r.activation(),
        "routing": "softmax_topk",
        "renormalize": bool(r.get("norm_topk_prob", default=True)),
    }
    warnings.warn(
        f"{origin}: model_type {r.model_type!r} is not one tilemoe knows ({', '.join(known_model_types())}); "
        "assuming softmax top-k routing with no shared experts",
        stacklevel=3,
    )
    return MoEConfig(name=name, extra=_extra(r, _layers(r), family="generic"), **fields)


# -------------------------------------------------------------------------------------------- presets
def _preset_files() -> dict[str, Any]:
    root = resources.files("tilemoe") / "presets"
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names of the presets shipped in ``tilemoe/presets`` (sorted)."""
    return sorted(_preset_files())


def load_preset(name: str) -> MoEConfig:
    """The preset ``name`` (case-insensitive). Raises ``ValueError`` listing the known presets."""
    files = _preset_files()
    key = name.lower()
    if key not in files:
        raise ValueError(f"preset: expected one of {sorted(files)}, got {name!r}")
    d = json.loads(files[key].read_text())
    return config_from_hf_dict(d, name=key, origin=f"preset {key!r}")


def read_config_json(path: str | os.PathLike) -> dict:
    """The dict in a config.json file; ``ValueError`` naming the path when it is not a JSON object."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _download_config(repo_id: str) -> Path:
    """config.json of an HF model id: from the hub when online, from the local cache when HF_HUB_OFFLINE is set."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(
            f"name_or_path: {repo_id!r} is not a preset ({', '.join(list_presets())}) nor a local path, and "
            "huggingface_hub is not installed to fetch it as an HF model id (pip install huggingface_hub)"
        ) from None
    offline = _offline()
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=offline))
    except Exception as error:  # the hub raises many kinds (offline, gated, missing repo, network)
        where = "the local HF cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise ValueError(
            f"name_or_path: {repo_id!r} is not a preset ({', '.join(list_presets())}) nor a local path, and "
            f"its config.json could not be read from {where}: {type(error).__name__}: {error}"
        ) from None


def load_config(name_or_path: str | os.PathLike) -> MoEConfig:
    """A MoEConfig from a preset name, a config.json path, a model directory or an HF model id.

    Order: a preset name (case-insensitive), an existing file (config.json), an existing directory holding
    config.json, else an HF model id ("org/name") whose config.json is fetched with huggingface_hub -- from
    the local cache only when ``HF_HUB_OFFLINE`` is set.

    Raises:
        ValueError: unknown name (the message lists the presets), a directory without config.json, a
            config.json without the keys of a known MoE layout (the message names the missing key), or an
            HF id that cannot be fetched.
    """
    text = os.fspath(name_or_path)
    if text.lower() in _preset_files():
        return load_preset(text)
    path = Path(text).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ValueError(f"name_or_path: directory {str(path)!r} has no config.json")
        path = cfg
    if path.is_file():
        return config_from_hf_dict(read_config_json(path), name=path.parent.name or path.stem, origin=str(path))
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        cfg = _download_config(text)
        return config_from_hf_dict(read_config_json(cfg), name=text, origin=f"{text}/config.json")
    raise ValueError(
        f"name_or_path: expected a preset ({', '.join(list_presets())}), a config.json path, a model directory "
        f"or an HF model id 'org/name', got {text!r}"
    )
