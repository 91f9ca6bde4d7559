"""The ladder of MoE expert implementations, one file each, all in one registry (see ``_registry``)."""

from __future__ import annotations

import importlib

from tilemoe.impls._registry import (
    Implementation,
    all_impls,
    available_impls,
    get_impl,
    register_impl,
    resolve_impl,
    unregister_impl,
)

# Built-in implementation modules, imported for their @register_impl side effect on the registry
# (inside tilemoe only; importing tilemoe never patches anything outside it).
_BUILTIN = (
    "reference",
    "naive",
    "batched",
    "fused_act",
    "memeff",
    "grouped",
    "grouped_graphs",
    "grouped_compiled",
    "torch_grouped_mm",
    "triton",
    "persistent",
)
for _module in _BUILTIN:
    try:
        importlib.import_module(f"tilemoe.impls.{_module}")
    except ModuleNotFoundError as error:  # a rung not written yet, or an optional dependency missing
        if error.name != f"tilemoe.impls.{_module}" and not (error.name or "").startswith("triton"):
            raise

__all__ = [
    "Implementation",
    "all_impls",
    "available_impls",
    "get_impl",
    "register_impl",
    "resolve_impl",
    "unregister_impl",
]
