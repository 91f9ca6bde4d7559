"""transformers integration: build a tilemoe.MoE from a transformers MoE block, and run transformers' experts
through tilemoe. Nothing here runs at import time: ``register()`` must be called.

Two entry points:

``from_hf_block(block)`` -> ``tilemoe.MoE`` computing what the block computes (router included), for the MoE
blocks of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, gpt-oss, Llama-4 (text), GraniteMoE
and GraniteMoeShared (transformers 5.x). Its parameters are the block's own ``nn.Parameter`` objects where the
layouts agree; copies only where the layout forces one:

    shared (same storage)    router weight (+ gpt-oss router bias); w13/w2 of every family whose experts are
                             [E, 2I, H] / [E, H, I] (all but gpt-oss and Llama-4); gpt-oss b2; the shared
                             expert's down_proj (-> shared_w2) and Qwen2-MoE's shared_expert_gate;
                             GraniteMoeShared's input_linear; DeepSeek-V3's e_score_correction_bias (fp32)
    copied                   gpt-oss w13 and b13 (gate/up interleaved), gpt-oss and Llama-4 w13/w2 (stored
                             transposed [E, H, 2I] / [E, I, H]: tilemoe's kernels read contiguous [E, 2I, H]
                             rows, so a strided view would not do), shared_w13 (gate_proj and up_proj are two
                             separate nn.Linear weights, concatenated)

transformers 4.x blocks whose experts are a ModuleList of per-expert MLPs (w1/w3/w2 or gate_proj/up_proj/
down_proj) are read too; their experts are stacked, so copied. A copied tensor no longer follows the block:
rebuild after changing the block's weights.

``register()`` adds "tilemoe" to transformers' ``ExpertsInterface``: then ``experts_implementation="tilemoe"``
(``from_pretrained`` / ``from_config``) or ``model.set_experts_implementation("tilemoe")`` runs every experts
module decorated with ``@use_experts_implementation`` through ``tilemoe.experts_forward``. Routing stays
transformers'. Llama-4's ``Llama4TextExperts`` is not on that interface (it computes every expert for every
token), so this path does not reach Llama-4; use ``from_hf_block`` there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tilemoe.config import MoEConfig
from tilemoe.convert import (
    HF_LAYOUTS,
    PER_EXPERT_NAMES,
    HFExpertsLayout,
    b13_from_hf,
    from_per_expert_state_dict,
    w2_from_hf,
    w13_from_hf,
)
from tilemoe.functional import experts_forward
from tilemoe.module import MoE

__all__ = ["IMPLEMENTATION_NAME", "from_hf_block", "hf_experts_forward", "patch_model", "register", "unregister"]

IMPLEMENTATION_NAME = "tilemoe"


# ------------------------------------------------------------------------------------------ from_hf_block
def _hf_config_dict(block: nn.Module, config: Any) -> dict:
    if config is None:
        config = getattr(block, "config", None)
    if config is None:
        config = getattr(getattr(block, "experts", None), "config", None)
    if config is None:
        raise ValueError(
            f"config: {type(block).__name__} keeps no transformers config; pass config=<the model's (text) config> "
            "or a MoEConfig"
        )
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config: expected a MoEConfig, a transformers config or a dict, got {type(config).__name__}")


def _layout_of(experts: nn.Module) -> HFExpertsLayout:
    if hasattr(experts, "is_transposed"):  # set by @use_experts_implementation
        return HFExpertsLayout(
            transposed=bool(experts.is_transposed),
            interleaved=not bool(getattr(experts, "is_concatenated", True)),
            bias=bool(getattr(experts, "has_bias", False)),
        )
    by_class = {"Llama4TextExperts": "llama4_text", "GptOssExperts": "gpt_oss"}  # also transformers 4.x
    if type(experts).__name__ in by_class:
        return HF_LAYOUTS[by_class[type(experts).__name__]]
    raise TypeError(
        f"block.experts: {type(experts).__name__} is neither a transformers @use_experts_implementation experts "
        "module nor Llama4TextExperts"
    )


def _per_expert_weights(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers 4.x blocks: one MLP per expert (w1/w3/w2 or gate_proj/up_proj/down_proj), stacked (a copy).

    Returns (w13, w2, a gate weight, a down weight); the last two tell whether the copies should train.
    """
    first = experts[0] if len(experts) else None
    if first is not None and all(hasattr(first, n) for n in ("w1", "w3", "w2")):
        names = PER_EXPERT_NAMES["mixtral"]
    elif first is not None and all(hasattr(first, n) for n in ("gate_proj", "up_proj", "down_proj")):
        names = PER_EXPERT_NAMES["gate_up_down"]
    else:
        raise TypeError(
            "block.experts: a ModuleList of per-expert MLPs needs w1/w3/w2 or gate_proj/up_proj/down_proj, "
            f"got {type(first).__name__}"
        )
    for e, mlp in enumerate(experts):
        for name in names:
            if getattr(getattr(mlp, name), "bias", None) is not None:
                raise ValueError(f"block.experts[{e}].{name}: tilemoe's routed experts have no such bias, got one")
    w13, w2 = from_per_expert_state_dict(experts.state_dict(), "", len(experts), names=names)
    return w13, w2, getattr(first, names[0]).weight, getattr(first, names[2]).weight


def _router_of(block: nn.Module) -> nn.Module:
    for name in ("gate", "router"):
        router = getattr(block, name, None)
        if isinstance(router, nn.Module) and isinstance(getattr(router, "weight", None), torch.Tensor):
            return router
    raise TypeError(f"block: {type(block).__name__} has no router (.gate or .router with a .weight)")


def _linear_weight(mlp: nn.Module, name: str) -> torch.Tensor:
    linear = getattr(mlp, name)
    if getattr(linear, "bias", None) is not None:
        raise ValueError(f"shared expert {name}: tilemoe's shared expert has no bias, got one (mlp_bias=True)")
    return linear.weight


def _shared_of(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(shared_w13 [2Is, H], shared_w2 [H, Is], shared_gate [1, H] or None) of the block, or None."""
    mlp = getattr(block, "shared_expert", None)  # Qwen2-MoE, Llama-4
    if mlp is None:
        mlp = getattr(block, "shared_experts", None)  # DeepSeek-V2/V3
    if mlp is None:
        return None
    if hasattr(mlp, "input_linear"):  # GraniteMoeShared: one [2Is, H] linear, gate rows then up rows
        return _linear_weight(mlp, "input_linear"), _linear_weight(mlp, "output_linear"), None
    w13 = torch.cat((_linear_weight(mlp, "gate_proj"), _linear_weight(mlp, "up_proj")), dim=0)
    gate = getattr(block, "shared_expert_gate", None)
    return w13, _linear_weight(mlp, "down_proj"), None if gate is None else gate.weight


def _as_param(t: torch.Tensor, like: torch.Tensor | None = None) -> nn.Parameter:
    """The block's Parameter itself when t is one (shared storage); else a new Parameter around t that
    trains when ``like`` (the block tensor it was converted from) does."""
    if isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach(), requires_grad=(like if like is not None else t).requires_grad)


def _moe_config_for(block: nn.Module, config: Any, router: nn.Module) -> MoEConfig:
    if isinstance(config, MoEConfig):
        return config
    from tilemoe.hf_config import config_from_hf_dict

    d = _hf_config_dict(block, config)
    cfg = config_from_hf_dict(d, name=d.get("model_type"))
    changes: dict[str, Any] = {}
    if cfg.extra.get("model_type") == "deepseek_v2" and cfg.renormalize:
        changes["renormalize"] = False  # DeepseekV2TopkRouter (transformers) never renormalises the top-k
    if cfg.has_shared_experts and _shared_of(block) is None:
        # GraniteMoeShared keeps its shared MLP in the decoder layer, outside the MoE block
        changes.update(num_shared_experts=0, shared_intermediate_size=0, shared_expert_gate=False)
    if cfg.score_correction_bias and getattr(router, "e_score_correction_bias", None) is None:
        changes["score_correction_bias"] = False
    return cfg.replace(**changes) if changes else cfg


@torch.no_grad()
def from_hf_block(block: nn.Module, *, impl: str = "auto", config: Any = None) -> MoE:
    """A ``tilemoe.MoE`` that computes what a transformers MoE block computes, sharing its weights.

    Args:
        block: the MoE block of a transformers model (``model.model.layers[i].mlp``; Llama-4:
            ``.feed_forward``; Granite: ``.block_sparse_moe``): MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock,
            Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock, DeepseekV2Moe, DeepseekV3MoE, GptOssMLP,
            Llama4TextMoe, GraniteMoeMoE, GraniteMoeSharedMoE.
        impl: the tilemoe implementation the module runs ("auto", "reference", ...).
        config: None (read the block's ``config`` or its experts' ``config``), a transformers config, its
            ``to_dict()``, or a ``MoEConfig`` used as is. Llama4TextMoe keeps no config: pass the text config.
    Returns:
        ``tilemoe.MoE`` whose ``forward(x)`` equals the block's output (the first element for gpt-oss and
        Llama-4, whose blocks also return router scores / logits). See the module docstring for which
        tensors share storage with the block and which are copies.
    Raises:
        TypeError: not a known MoE block. ValueError: no config found, a config that disagrees with the
        block's weight shapes, or a layout tilemoe has no equivalent for (biased shared experts).
    """
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise TypeError(f"block: expected a transformers MoE block with .experts, got {type(block).__name__}")
    router = _router_of(block)
    cfg = _moe_config_for(block, config, router)
    if isinstance(experts, nn.ModuleList):
        layout = HFExpertsLayout()
        w13, w2, gate_up, down = _per_expert_weights(experts)
    else:
        layout = _layout_of(experts)
        if getattr(experts, "has_post_expert_norm", False):
            raise ValueError(f"block.experts: {type(experts).__name__} has a post-expert norm; tilemoe has none")
        if not getattr(experts, "has_gate", True):
            raise ValueError(f"block.experts: {type(experts).__name__} is ungated (up_proj only); not supported")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if layout.transposed or layout.interleaved:
            w13 = w13_from_hf(gate_up, transposed=layout.transposed, interleaved=layout.interleaved)
            w2 = w2_from_hf(down, transposed=layout.transposed)
        else:
            w13, w2 = gate_up, down
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    if tuple(w13.shape) != (e, cfg.w13_rows, h) or tuple(w2.shape) != (e, h, i):
        raise ValueError(
            f"config: E={e}, H={h}, I={i} expects w13 [{e}, {cfg.w13_rows}, {h}] and w2 [{e}, {h}, {i}], but "
            f"{type(experts).__name__} holds {list(w13.shape)} and {list(w2.shape)}"
        )
    if cfg.expert_bias != layout.bias:
        raise ValueError(f"config: expert_bias={cfg.expert_bias} but the block's experts have bias={layout.bias}")

    # Built on the meta device so nothing is allocated twice; every tensor is replaced below.
    moe = MoE(cfg, device="meta", impl=impl)
    moe.router_weight = _as_param(router.weight)
    if cfg.router_bias:
        if getattr(router, "bias", None) is None:
            raise ValueError("config: router_bias=True but the block's router has no bias")
        moe.router_bias = _as_param(router.bias)
    moe.w13 = _as_param(w13, gate_up)
    moe.w2 = _as_param(w2, down)
    if cfg.expert_bias:
        bias13 = experts.gate_up_proj_bias
        moe.b13 = _as_param(b13_from_hf(bias13, interleaved=layout.interleaved), bias13)
        moe.b2 = _as_param(experts.down_proj_bias)
    if cfg.score_correction_bias:
        bias = router.e_score_correction_bias
        moe.correction_bias = bias if bias.dtype == torch.float32 else bias.float()
    if cfg.has_shared_experts:
        shared = _shared_of(block)
        if shared is None:
            raise ValueError(f"config: has shared experts but {type(block).__name__} holds none")
        shared_w13, shared_w2, shared_gate = shared
        moe.shared_w13 = _as_param(shared_w13, shared_w2)
        moe.shared_w2 = _as_param(shared_w2)
        if cfg.shared_expert_gate:
            if shared_gate is None:
                raise ValueError("config: shared_expert_gate=True but the block has no shared_expert_gate")
            moe.shared_gate = _as_param(shared_gate)
    left = [name for name, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    assert not left, f"from_hf_block left meta tensors: {left}"
    return moe


# ------------------------------------------------------------------------------------- experts interface
def _activation_of(module: nn.Module) -> dict[str, Any]:
    """MoEConfig activation fields of an @use_experts_implementation experts module."""
    from transformers.integrations import moe as hf_moe

    default_gate = getattr(hf_moe, "_default_apply_gate", None)
    custom_gate = getattr(type(module), "_apply_gate", default_gate) is not default_gate
    if custom_gate:
        if hasattr(module, "alpha") and hasattr(module, "limit"):  # GptOssExperts._apply_gate
            return {"activation": "swigluoai", "swiglu_alpha": float(module.alpha), "swiglu_limit": float(module.limit)}
        raise NotImplementedError(
            f"experts_implementation='tilemoe': {type(module).__name__} has its own _apply_gate that tilemoe does "
            "not know; use another experts_implementation for this model"
        )
    from transformers.activations import ACT2FN

    from tilemoe.hf_config import _ACTIVATIONS

    # By the activation object itself: the config key naming it differs per family (hidden_act, mlp_hidden_act)
    act_type = type(getattr(module, "act_fn", None))
    for hf_name, ours in _ACTIVATIONS.items():
        if hf_name in ACT2FN and type(ACT2FN[hf_name]) is act_type:
            return {"activation": ours}
    raise NotImplementedError(
        f"experts_implementation='tilemoe': activation {act_type.__name__} of {type(module).__name__} is not one "
        f"of tilemoe's ({', '.join(sorted(set(_ACTIVATIONS.values())))})"
    )


def _key(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)


def _tilemoe_weights(module: nn.Module, top_k: int) -> tuple[MoEConfig, torch.Tensor, torch.Tensor, Any, Any]:
    """(config, w13, w2, b13, b2) in tilemoe's layout, cached on the module until its weights change.

    Standard layouts use the module's own tensors; transposed or interleaved ones (gpt-oss) keep one converted
    copy per experts module, refreshed when a weight's storage or version counter changes.
    """
    gated = bool(getattr(module, "has_gate", True))
    first = module.gate_up_proj if gated else module.up_proj
    bias13 = (module.gate_up_proj_bias if gated else module.up_proj_bias) if module.has_bias else None
    bias2 = module.down_proj_bias if module.has_bias else None
    key = (top_k, *_key(first, module.down_proj, bias13, bias2))
    cache = module.__dict__.get("_tilemoe_cache")
    if cache is not None and cache[0] == key:
        return cache[1]

    transposed = bool(module.is_transposed)
    interleaved = gated and not bool(getattr(module, "is_concatenated", True))
    if transposed or interleaved:
        w13 = w13_from_hf(first, transposed=transposed, interleaved=interleaved)
        w2 = w2_from_hf(module.down_proj, transposed=transposed)
    else:
        w13, w2 = first, module.down_proj
    b13 = None if bias13 is None else (b13_from_hf(bias13, interleaved=True) if interleaved else bias13)
    e, rows, h = w13.shape
    cfg = MoEConfig(
        num_experts=e,
        top_k=top_k,
        hidden_size=h,
        intermediate_size=w2.shape[2],
        gated=gated,
        expert_bias=bias13 is not None,
        **_activation_of(module),
    )
    out = (cfg, w13, w2, b13, bias2)
    module.__dict__["_tilemoe_cache"] = (key, out)  # plain attribute: not a parameter, not in state_dict
    return out


def hf_experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """transformers' experts-function signature on tilemoe: hidden_states [T, H], top_k_index [T, K] int,
    top_k_weights [T, K] -> [T, H] in hidden_states.dtype.

    ``module`` is a ``@use_experts_implementation`` experts module (gate_up_proj / down_proj, its layout flags
    is_transposed / is_concatenated / has_bias / has_gate). Expert-parallel sentinel ids (>= num_experts) get
    weight 0. Raises NotImplementedError for a post-expert norm or a gating tilemoe does not know.
    """
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(
            f"experts_implementation='tilemoe': {type(module).__name__} applies a post-expert norm; tilemoe has none"
        )
    cfg, w13, w2, b13, b2 = _tilemoe_weights(module, top_k_index.shape[-1])
    ids, weights = top_k_index, top_k_weights
    if getattr(module, "_is_expert_parallel", False):
        sentinel = ids >= cfg.num_experts
        weights = weights.masked_fill(sentinel, 0.0)
        ids = ids.clamp(max=cfg.num_experts - 1)
    x = hidden_states if hidden_states.is_contiguous() else hidden_states.contiguous()
    return experts_forward(x, w13, w2, weights, ids, config=cfg, impl=impl, b13=b13, b2=b2)


def _experts_interface():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        import transformers

        raise ImportError(
            "tilemoe.integrations.hf.register: needs transformers' experts interface "
            "(transformers.integrations.moe.ExpertsInterface, transformers >= 5); installed transformers "
            f"{transformers.__version__} has none ({error}). tilemoe.from_hf(block) works without it."
        ) from None
    return ExpertsInterface


def register(impl: str = "auto") -> str:
    """Register tilemoe as experts implementation "tilemoe" in transformers; returns that name.

    Idempotent (a second call replaces the first, e.g. to change ``impl``). Afterwards
    ``AutoModelForCausalLM.from_pretrained(..., experts_implementation="tilemoe")`` or
    ``model.set_experts_implementation("tilemoe")`` runs the experts through ``tilemoe.experts_forward``
    with implementation ``impl``. Raises ImportError when transformers has no experts interface.
    """
    interface = _experts_interface()

    def tilemoe_experts(module, hidden_states, top_k_index, top_k_weights):
        return hf_experts_forward(module, hidden_states, top_k_index, top_k_weights, impl=impl)

    tilemoe_experts.tilemoe_impl = impl
    interface.register(IMPLEMENTATION_NAME, tilemoe_experts)
    return IMPLEMENTATION_NAME


def unregister() -> None:
    """Remove "tilemoe" from transformers' experts interface (no-op when absent)."""
    interface = _experts_interface()
    interface._global_mapping.pop(IMPLEMENTATION_NAME, None)


def patch_model(model: nn.Module, impl: str = "auto") -> nn.Module:
    """``register(impl)`` then ``model.set_experts_implementation("tilemoe")``; returns the model (same object).

    Raises TypeError when ``model`` is not a transformers model with ``set_experts_implementation``, and
    ImportError when transformers has no experts interface.
    """
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(
            f"model: expected a transformers model with set_experts_implementation, got {type(model).__name__}"
        )
    register(impl)
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    return model
