"""MoE: the nn.Module that owns one layer's weights and calls ``tilemoe.functional``. No kernel code."""

from __future__ import annotations

import math

import torch
from torch import nn

from tilemoe.config import MoEConfig
from tilemoe.functional import moe_forward
from tilemoe.ops.route import route_fast, route_tokens
from tilemoe.ops.router import router_logits_fast, uses_router_parts

__all__ = ["MoE", "add_moe_parameters"]


def add_moe_parameters(
    module: nn.Module,
    config: MoEConfig,
    *,
    num_local_experts: int | None = None,
    tp_size: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Give ``module`` one MoE layer's parameters (uninitialised), in the layout ``MoE`` documents.

    The expert-parallel layer calls it with its ``num_local_experts`` and ``tp_size`` (experts split along I);
    router, correction bias and shared experts stay whole.
    """
    e, h = config.num_experts, config.hidden_size
    n = e if num_local_experts is None else num_local_experts
    i, w13_rows = config.intermediate_size // tp_size, config.w13_rows // tp_size
    kw = {"dtype": dtype, "device": device}
    module.router_weight = nn.Parameter(torch.empty(e, h, **kw))
    module.router_bias = nn.Parameter(torch.empty(e, **kw)) if config.router_bias else None
    if config.score_correction_bias:
        module.register_buffer("correction_bias", torch.zeros(e, dtype=torch.float32, device=device))
    else:
        module.correction_bias = None
    module.w13 = nn.Parameter(torch.empty(n, w13_rows, h, **kw))
    module.w2 = nn.Parameter(torch.empty(n, h, i, **kw))
    module.b13 = nn.Parameter(torch.empty(n, w13_rows, **kw)) if config.expert_bias else None
    module.b2 = nn.Parameter(torch.empty(n, h, **kw)) if config.expert_bias else None
    if config.has_shared_experts:
        si = config.shared_intermediate_size
        module.shared_w13 = nn.Parameter(torch.empty(2 * si if config.gated else si, h, **kw))
        module.shared_w2 = nn.Parameter(torch.empty(h, si, **kw))
        module.shared_gate = nn.Parameter(torch.empty(1, h, **kw)) if config.shared_expert_gate else None
    else:
        module.shared_w13 = module.shared_w2 = module.shared_gate = None


class MoE(nn.Module):
    """One Mixture-of-Experts layer.

    Parameters (E experts, H hidden, I per-expert intermediate, Is shared intermediate):
        router_weight [E, H] (+ router_bias [E] when config.router_bias)
        correction_bias [E] (buffer, when config.score_correction_bias)
        w13 [E, 2I, H] (gate rows then up rows; [E, I, H] plain), w2 [E, H, I]
        b13 [E, 2I], b2 [E, H] when config.expert_bias
        shared_w13 [2Is, H], shared_w2 [H, Is], shared_gate [1, H] when the config has shared experts

    ``forward(x)`` takes [T, H] or [B, S, H] and returns the same shape; ``impl`` picks the registered
    implementation ("auto": the fastest available on x's device).
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        self.impl = impl
        add_moe_parameters(self, config, dtype=dtype, device=device)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights scaled like nn.Linear (uniform in +-1/sqrt(fan_in)); biases small."""
        for name, param in self.named_parameters():
            fan_in = param.shape[-1] if param.dim() >= 2 else self.config.hidden_size
            bound = 1.0 / math.sqrt(fan_in)
            if param.dim() < 2 or name in ("b13", "b2"):
                bound *= 0.1
            param.uniform_(-bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (logits fp32 [T, E], topk_weights fp32 [T, K], topk_ids int32 [T, K])."""
        logits = router_logits_fast(x, self.router_weight, self.router_bias)
        weights, ids = route_fast(logits, self.config, correction_bias=self.correction_bias)
        return logits, weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.shape[-1] != c.hidden_size:
            raise ValueError(f"x: expected last dim hidden_size={c.hidden_size}, got shape {list(x.shape)}")
        x2 = x.reshape(-1, c.hidden_size)
        if uses_router_parts(x2, self.router_weight):  # a prefill batch: no [T, E] logits written (route_tokens)
            weights, ids = route_tokens(
                x2, self.router_weight, c, router_bias=self.router_bias, correction_bias=self.correction_bias
            )
            routing = dict(topk_weights=weights, topk_ids=ids)
        else:  # the logits, which an implementation may route inside its kernels (triton's decode path)
            routing = dict(router_logits=router_logits_fast(x2, self.router_weight, self.router_bias))
        out = moe_forward(
            x2,
            self.w13,
            self.w2,
            **routing,
            config=c,
            impl=self.impl,
            b13=self.b13,
            b2=self.b2,
            correction_bias=self.correction_bias,
            shared_w13=self.shared_w13,
            shared_w2=self.shared_w2,
            shared_gate=self.shared_gate,
        )
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"E={c.num_experts}, K={c.top_k}, H={c.hidden_size}, I={c.intermediate_size}, "
            f"activation={c.activation}, gated={c.gated}, routing={c.routing}, impl={self.impl!r}"
        )
