"""tilemoe: fast Mixture-of-Experts layers on NVIDIA GPUs (PyTorch + Triton)."""

from tilemoe.config import MoEConfig
from tilemoe.functional import experts_forward, moe_forward
from tilemoe.impls import available_impls, get_impl, register_impl
from tilemoe.module import MoE
from tilemoe.routing import route


def from_hf(block, **kwargs):
    """A tilemoe.MoE built from a transformers MoE block, sharing its weights where layouts allow."""
    from tilemoe.integrations.hf import from_hf_block

    return from_hf_block(block, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEConfig",
    "available_impls",
    "experts_forward",
    "from_hf",
    "get_impl",
    "moe_forward",
    "register_impl",
    "route",
]
