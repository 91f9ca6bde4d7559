"""MoEConfig: the one description of an MoE layer that every part of tilemoe reads.

Dimension letters used throughout tilemoe:
    T tokens, E experts, K experts per token (top-k), H hidden size, I intermediate size of one expert.

Weight layout (see ``tilemoe.module.MoE``):
    w13 [E, 2I, H]  gate rows then up rows (gated);  [E, I, H] when the MLP is plain
    w2  [E, H, I]
    b13 [E, 2I] / [E, I], b2 [E, H]  optional expert biases
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swigluoai")
ROUTINGS = (
    "softmax_topk",  # softmax over all E, then top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2)
    "topk_softmax",  # top-k on the logits, then softmax over the K picked (gpt-oss, GraniteMoE)
    "sigmoid_grouped_topk",  # sigmoid, groups, correction bias, scaling (DeepSeek-V3)
    "softmax_grouped_topk",  # softmax, groups ranked by their best expert (DeepSeek-V2 group_limited_greedy)
    "sigmoid_top1_input_scaled",  # top-k logits, sigmoid, weight multiplies the expert input (Llama-4)
)


@dataclass
class MoEConfig:
    """Shape and math of one MoE layer.

    Raises ``ValueError`` from ``validate()`` (called by ``__post_init__``) when a field is out of range.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    expert_bias: bool = False
    # swigluoai (gpt-oss): out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    routing: str = "softmax_topk"
    renormalize: bool = True
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    score_correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # total intermediate width of the shared expert MLP
    shared_expert_gate: bool = False  # Qwen2-MoE: out += sigmoid(x @ g) * shared(x)
    name: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for key in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{key}: expected a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k: expected top_k <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "swigluoai" and not self.gated:
            raise ValueError("MoEConfig.activation: 'swigluoai' needs gated=True, got gated=False")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoEConfig.routing: expected one of {ROUTINGS}, got {self.routing!r}")
        if self.routing in ("sigmoid_grouped_topk", "softmax_grouped_topk"):
            if self.n_group <= 0 or self.num_experts % self.n_group:
                raise ValueError(
                    f"MoEConfig.n_group: expected a divisor of num_experts ({self.num_experts}), got {self.n_group}"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"MoEConfig.topk_group: expected 1 <= topk_group <= n_group ({self.n_group}), got {self.topk_group}"
                )
            if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                raise ValueError(
                    f"MoEConfig.topk_group: {self.topk_group} groups of {self.num_experts // self.n_group} "
                    f"experts hold fewer than top_k ({self.top_k}) experts"
                )
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts: expected >= 0, got {self.num_shared_experts}")
        if self.num_shared_experts and self.shared_intermediate_size <= 0:
            raise ValueError(
                "MoEConfig.shared_intermediate_size: expected > 0 when num_shared_experts > 0, "
                f"got {self.shared_intermediate_size}"
            )

    # ------------------------------------------------------------ derived sizes
    @property
    def weights_on_input(self) -> bool:
        """True when the routing weight scales the expert's input instead of its output (Llama-4)."""
        return self.routing == "sigmoid_top1_input_scaled"

    @property
    def w13_rows(self) -> int:
        """Rows of one expert's first weight: 2I gated (gate then up), I plain."""
        return 2 * self.intermediate_size if self.gated else self.intermediate_size

    @property
    def has_shared_experts(self) -> bool:
        return self.num_shared_experts > 0

    def flops_per_token(self) -> int:
        """Matmul FLOPs (2 per multiply-add) of one token through one MoE layer: its K routed experts, the
        shared expert MLP (and its gate) and the router. Activations, biases and the combine are not counted."""
        h, i = self.hidden_size, self.intermediate_size
        routed = 2 * self.top_k * (h * self.w13_rows + i * h)
        shared = 0
        if self.has_shared_experts:
            si = self.shared_intermediate_size
            shared = 2 * (h * (2 * si if self.gated else si) + si * h)
            if self.shared_expert_gate:
                shared += 2 * h
        router = 2 * h * self.num_experts
        return routed + shared + router

    def expert_weight_elements(self) -> int:
        """Elements of one routed expert's weights (w13 + w2)."""
        return self.hidden_size * self.w13_rows + self.intermediate_size * self.hidden_size

    def weight_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Weight bytes one token touches: its K experts (with their biases), the shared experts (with their
        gate) and the router (with its bias)."""
        h = self.hidden_size
        routed = self.expert_weight_elements()
        if self.expert_bias:
            routed += self.w13_rows + h
        shared = 0
        if self.has_shared_experts:
            si = self.shared_intermediate_size
            shared = h * ((2 * si if self.gated else si) + si) + (h if self.shared_expert_gate else 0)
        router = h * self.num_experts + (self.num_experts if self.router_bias else 0)
        return bytes_per_element * (self.top_k * routed + shared + router)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"MoEConfig.from_dict: unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> MoEConfig:
        """A preset name, a config.json path, a model directory, or an HF model id (online only).

        Raises ``ValueError`` naming the missing key when a config.json has no MoE layout tilemoe knows.
        """
        from tilemoe.hf_config import load_config

        return load_config(name_or_path)
