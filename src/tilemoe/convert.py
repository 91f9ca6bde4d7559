"""Expert weight layouts of other libraries <-> tilemoe's, both ways. Pure functions, no module state.

tilemoe's layout (see ``tilemoe.module.MoE``), E experts, H hidden, I per-expert intermediate:
    w13 [E, 2I, H]  gate rows then up rows ([E, I, H] for a plain MLP); w2 [E, H, I]
    b13 [E, 2I] (gate then up), b2 [E, H]

transformers 5.x stacked experts (``modeling_*.py`` of each family, read from transformers 5.23):
    Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GraniteMoE(Shared):
        gate_up_proj [E, 2I, H] (gate then up), down_proj [E, H, I]: tilemoe's layout exactly.
    gpt-oss (``is_transposed=True, is_concatenated=False, has_bias=True``):
        gate_up_proj [E, H, 2I] with gate/up INTERLEAVED along the last dim (gate = [..., 0::2],
        up = [..., 1::2]), gate_up_proj_bias [E, 2I] interleaved the same way,
        down_proj [E, I, H], down_proj_bias [E, H].
    Llama-4 text (``Llama4TextExperts``, not on the experts interface):
        gate_up_proj [E, H, 2I] (gate then up, concatenated), down_proj [E, I, H].
    -> ``w13_from_hf`` / ``w13_to_hf``, ``w2_from_hf`` / ``w2_to_hf``, ``b13_from_hf`` / ``b13_to_hf`` with
       ``transposed`` / ``interleaved`` flags; ``HF_LAYOUTS`` lists them per model_type.

Per-expert checkpoint keys (the pre-5.0 / original safetensors layout; each an nn.Linear weight [out, in]):
    Mixtral:                    ``{prefix}{e}.w1.weight`` gate [I, H], ``w3`` up [I, H], ``w2`` down [H, I]
    Qwen / DeepSeek / OLMoE:    ``{prefix}{e}.gate_proj.weight``, ``up_proj``, ``down_proj`` (same shapes)
    -> ``from_per_expert_state_dict`` / ``to_per_expert_state_dict``.

sgl-jax (github.com/sgl-project/sglang-jax, ``python/sgl_jax/srt/layers/moe.py`` and ``fused_moe.py``; JAX
weights are [in, out] -- x @ w -- so they are tilemoe's transposed). What its source shows:
    EPMoE:      wi_0 [E, H, I] gate, wi_1 [E, H, I] up, wo [E, I, H] (``(num_experts, hidden, intermediate)``
                in most versions; one benchmark variant initialises wi_* as (E, I, H) "n, k" -- pass
                ``transposed=False`` for that one).
    FusedEPMoE: one version holds ``w1`` 4-D (E, 2, H, I), dim 1 = [gate, up], and ``w2`` (E, I, H); newer
                versions hold unfused ``w1``/``w3`` (E, H, I) and ``w2`` (E, I, H) -- the EPMoE layout, use
                ``to_epmoe``. ``to_fused_epmoe(..., transposed=False)`` gives the [E, 2, I, H] / [E, H, I]
                orientation instead.
    -> ``to_epmoe`` / ``from_epmoe``, ``to_fused_epmoe`` / ``from_fused_epmoe``.

Every function returns new contiguous tensors (never a view of its input) so the result can be stored or
handed to a kernel as is; ``tilemoe.integrations.hf.from_hf_block`` shares storage itself where the layouts
already match. Round trips are exact (pure data movement, no arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "HF_LAYOUTS",
    "HFExpertsLayout",
    "PER_EXPERT_NAMES",
    "b13_from_hf",
    "b13_to_hf",
    "from_epmoe",
    "from_fused_epmoe",
    "from_per_expert_state_dict",
    "to_epmoe",
    "to_fused_epmoe",
    "to_per_expert_state_dict",
    "w13_from_hf",
    "w13_to_hf",
    "w2_from_hf",
    "w2_to_hf",
]


@dataclass(frozen=True)
class HFExpertsLayout:
    """How a transformers experts module stores its weights.

    transposed: weights are [E, in, out] (x @ W) instead of [E, out, in] (nn.Linear).
    interleaved: gate and up alternate along the 2I axis (gate = 0::2, up = 1::2) instead of gate then up.
    bias: gate_up_proj_bias [E, 2I] and down_proj_bias [E, H] exist.
    """

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False


_STANDARD = HFExpertsLayout()
# model_type -> layout of its experts module in transformers 5.23
HF_LAYOUTS: dict[str, HFExpertsLayout] = {
    "mixtral": _STANDARD,
    "qwen2_moe": _STANDARD,
    "qwen3_moe": _STANDARD,
    "olmoe": _STANDARD,
    "deepseek_v2": _STANDARD,
    "deepseek_v3": _STANDARD,
    "granitemoe": _STANDARD,
    "granitemoeshared": _STANDARD,
    "gpt_oss": HFExpertsLayout(transposed=True, interleaved=True, bias=True),
    "llama4_text": HFExpertsLayout(transposed=True),
}

# naming style -> (gate, up, down) linear names of one expert in a per-expert checkpoint
PER_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "mixtral": ("w1", "w3", "w2"),
    "gate_up_down": ("gate_proj", "up_proj", "down_proj"),
}


def _check_3d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D tensor [E, rows, cols], got shape {list(t.shape)}")


def _check_even(name: str, size: int, what: str) -> None:
    if size % 2:
        raise ValueError(f"{name}: expected an even {what} (gate and up halves), got {size}")


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [E, I, ...] -> [E, 2I, ...] alternating gate row, up row (gpt-oss's order)."""
    return torch.stack((gate, up), dim=2).flatten(1, 2)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor with t's values (never a view of a caller's tensor)."""
    return t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------- transformers stacked
def w13_from_hf(gate_up_proj: torch.Tensor, *, transposed: bool = False, interleaved: bool = False) -> torch.Tensor:
    """transformers ``gate_up_proj`` -> tilemoe w13 [E, 2I, H] (gate rows then up rows), contiguous.

    gate_up_proj: [E, 2I, H] (``transposed=False``) or [E, H, 2I] (``transposed=True``); gate/up concatenated
    or, with ``interleaved=True``, alternating (gpt-oss). A plain (ungated) [E, I, H] works with
    ``interleaved=False``. Raises ValueError on a non-3-D input or an odd 2I with ``interleaved``.
    """
    _check_3d("gate_up_proj", gate_up_proj)
    w = gate_up_proj.transpose(1, 2) if transposed else gate_up_proj  # [E, 2I, H]
    if interleaved:
        _check_even("gate_up_proj", w.shape[1], "gate/up width 2I")
        w = torch.cat((w[:, 0::2], w[:, 1::2]), dim=1)
    return _fresh(w)


def w13_to_hf(w13: torch.Tensor, *, transposed: bool = False, interleaved: bool = False) -> torch.Tensor:
    """tilemoe w13 [E, 2I, H] -> transformers ``gate_up_proj`` ([E, H, 2I] when ``transposed``), contiguous.

    Inverse of ``w13_from_hf`` with the same flags. Raises ValueError on a non-3-D input or an odd 2I with
    ``interleaved``.
    """
    _check_3d("w13", w13)
    w = w13
    if interleaved:
        _check_even("w13", w.shape[1], "row count 2I")
        i = w.shape[1] // 2
        w = _interleave(w[:, :i], w[:, i:])
    if transposed:
        w = w.transpose(1, 2)
    return _fresh(w)


def w2_from_hf(down_proj: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """transformers ``down_proj`` [E, H, I] ([E, I, H] when ``transposed``) -> tilemoe w2 [E, H, I], contiguous."""
    _check_3d("down_proj", down_proj)
    w = down_proj.transpose(1, 2) if transposed else down_proj
    return _fresh(w)


def w2_to_hf(w2: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """tilemoe w2 [E, H, I] -> transformers ``down_proj`` ([E, I, H] when ``transposed``), contiguous."""
    _check_3d("w2", w2)
    w = w2.transpose(1, 2) if transposed else w2
    return _fresh(w)


def b13_from_hf(gate_up_proj_bias: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """transformers ``gate_up_proj_bias`` [E, 2I] -> tilemoe b13 [E, 2I] (gate then up), a new tensor."""
    if not isinstance(gate_up_proj_bias, torch.Tensor) or gate_up_proj_bias.dim() != 2:
        raise ValueError(f"gate_up_proj_bias: expected a 2-D tensor [E, 2I], got {_shape(gate_up_proj_bias)}")
    if not interleaved:
        return _fresh(gate_up_proj_bias)
    _check_even("gate_up_proj_bias", gate_up_proj_bias.shape[1], "width 2I")
    return torch.cat((gate_up_proj_bias[:, 0::2], gate_up_proj_bias[:, 1::2]), dim=1)


def b13_to_hf(b13: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """tilemoe b13 [E, 2I] -> transformers ``gate_up_proj_bias`` [E, 2I] (interleaved for gpt-oss), a new tensor."""
    if not isinstance(b13, torch.Tensor) or b13.dim() != 2:
        raise ValueError(f"b13: expected a 2-D tensor [E, 2I], got {_shape(b13)}")
    if not interleaved:
        return _fresh(b13)
    _check_even("b13", b13.shape[1], "width 2I")
    i = b13.shape[1] // 2
    return _fresh(_interleave(b13[:, :i], b13[:, i:]))


def _shape(t: object) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ---------------------------------------------------------------------------------- per-expert checkpoints
def _names(style: str | tuple[str, str, str]) -> tuple[str, str, str]:
    if isinstance(style, tuple) and len(style) == 3:
        return style
    if style in PER_EXPERT_NAMES:
        return PER_EXPERT_NAMES[style]
    raise ValueError(f"names: expected one of {sorted(PER_EXPERT_NAMES)} or a (gate, up, down) tuple, got {style!r}")


def from_per_expert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    num_experts: int,
    *,
    names: str | tuple[str, str, str] = "gate_up_down",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert linear weights -> (w13 [E, 2I, H], w2 [E, H, I]), new contiguous tensors.

    Reads ``f"{prefix}{e}.{name}.weight"`` for e in range(num_experts), e.g. prefix
    ``"model.layers.0.block_sparse_moe.experts."`` with ``names="mixtral"`` (w1 gate, w3 up, w2 down) or
    ``"model.layers.3.mlp.experts."`` with ``names="gate_up_down"`` (gate_proj, up_proj, down_proj).

    Raises KeyError naming the first missing key; ValueError when experts disagree in shape.
    """
    gate_name, up_name, down_name = _names(names)
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")

    def get(e: int, name: str) -> torch.Tensor:
        key = f"{prefix}{e}.{name}.weight"
        if key not in state_dict:
            raise KeyError(f"state_dict: no key {key!r} (expert {e} of {num_experts}, names={names!r})")
        return state_dict[key]

    gates = [get(e, gate_name) for e in range(num_experts)]
    ups = [get(e, up_name) for e in range(num_experts)]
    downs = [get(e, down_name) for e in range(num_experts)]
    for label, group in (("gate", gates), ("up", ups), ("down", downs)):
        shapes = {tuple(t.shape) for t in group}
        if len(shapes) != 1:
            raise ValueError(f"state_dict: {label} weights of {prefix}* differ in shape: {sorted(shapes)}")
    if gates[0].shape != ups[0].shape:
        raise ValueError(f"state_dict: gate {list(gates[0].shape)} and up {list(ups[0].shape)} shapes differ")
    w13 = torch.cat((torch.stack(gates), torch.stack(ups)), dim=1)
    w2 = torch.stack(downs)
    return w13, w2


def to_per_expert_state_dict(
    w13: torch.Tensor,
    w2: torch.Tensor,
    prefix: str,
    *,
    names: str | tuple[str, str, str] = "gate_up_down",
) -> dict[str, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) -> ``{f"{prefix}{e}.{name}.weight": tensor}``, new contiguous tensors.

    Inverse of ``from_per_expert_state_dict``. Raises ValueError on shapes that do not fit together.
    """
    gate_name, up_name, down_name = _names(names)
    e, i, _ = _check_pair(w13, w2)
    out: dict[str, torch.Tensor] = {}
    for x in range(e):
        out[f"{prefix}{x}.{gate_name}.weight"] = w13[x, :i].clone()
        out[f"{prefix}{x}.{up_name}.weight"] = w13[x, i:].clone()
        out[f"{prefix}{x}.{down_name}.weight"] = w2[x].clone()
    return out


# ---------------------------------------------------------------------------------- sgl-jax benchmark layouts
def _check_pair(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    _check_3d("w13", w13)
    _check_3d("w2", w2)
    _check_even("w13", w13.shape[1], "row count 2I")
    e, two_i, h = w13.shape
    if w2.shape != (e, h, two_i // 2):
        want = [e, h, two_i // 2]
        raise ValueError(f"w2: expected shape {want} to match w13 {list(w13.shape)}, got {list(w2.shape)}")
    return e, two_i // 2, h


def to_epmoe(
    w13: torch.Tensor, w2: torch.Tensor, *, transposed: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tilemoe (w13 [E, 2I, H], w2 [E, H, I]) -> sgl-jax EPMoE (wi_0, wi_1, wo).

    ``transposed=True`` (sgl-jax's EPMoE): wi_0 gate [E, H, I], wi_1 up [E, H, I], wo [E, I, H].
    ``transposed=False``: wi_0 [E, I, H], wi_1 [E, I, H], wo [E, H, I]. New contiguous tensors.
    """
    _, i, _ = _check_pair(w13, w2)
    gate, up = w13[:, :i], w13[:, i:]
    if transposed:
        gate, up, w2 = gate.transpose(1, 2), up.transpose(1, 2), w2.transpose(1, 2)
    return _fresh(gate), _fresh(up), _fresh(w2)


def from_epmoe(
    wi_0: torch.Tensor, wi_1: torch.Tensor, wo: torch.Tensor, *, transposed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """sgl-jax EPMoE (wi_0 gate, wi_1 up, wo) -> tilemoe (w13 [E, 2I, H], w2 [E, H, I]); see ``to_epmoe``."""
    for name, t in (("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)):
        _check_3d(name, t)
    if wi_0.shape != wi_1.shape:
        raise ValueError(f"wi_1: expected the shape of wi_0 {list(wi_0.shape)}, got {list(wi_1.shape)}")
    if wo.shape != (wi_0.shape[0], wi_0.shape[2], wi_0.shape[1]):
        want = [wi_0.shape[0], wi_0.shape[2], wi_0.shape[1]]
        raise ValueError(f"wo: expected shape {want} to match wi_0 {list(wi_0.shape)}, got {list(wo.shape)}")
    if transposed:
        wi_0, wi_1, wo = wi_0.transpose(1, 2), wi_1.transpose(1, 2), wo.transpose(1, 2)
    return torch.cat((wi_0, wi_1), dim=1), _fresh(wo)


def to_fused_epmoe(
    w13: torch.Tensor, w2: torch.Tensor, *, transposed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """tilemoe (w13 [E, 2I, H], w2 [E, H, I]) -> sgl-jax FusedEPMoE (w1, w2), dim 1 of w1 = [gate, up].

    ``transposed=True`` (the sgl-jax source): w1 [E, 2, H, I], w2 [E, I, H].
    ``transposed=False``: w1 [E, 2, I, H], w2 [E, H, I]. New contiguous tensors.
    """
    e, i, h = _check_pair(w13, w2)
    w1 = w13.reshape(e, 2, i, h)
    if transposed:
        w1, w2 = w1.transpose(2, 3), w2.transpose(1, 2)
    return _fresh(w1), _fresh(w2)


def from_fused_epmoe(
    w1: torch.Tensor, w2: torch.Tensor, *, transposed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """sgl-jax FusedEPMoE (w1, w2) -> tilemoe (w13 [E, 2I, H], w2 [E, H, I]); see ``to_fused_epmoe``."""
    if not isinstance(w1, torch.Tensor) or w1.dim() != 4 or w1.shape[1] != 2:
        raise ValueError(f"w1: expected a 4-D tensor [E, 2, H, I] or [E, 2, I, H], got {_shape(w1)}")
    _check_3d("w2", w2)
    if transposed:
        w1, w2 = w1.transpose(2, 3), w2.transpose(1, 2)
    e, _, i, h = w1.shape
    if w2.shape != (e, h, i):
        raise ValueError(f"w2: shape {list(w2.shape)} does not match w1 {list(w1.shape)} (transposed={transposed})")
    return _fresh(w1.reshape(e, 2 * i, h)), _fresh(w2)
