"""A family is data: one small registered spec per HF `model_type`.

Which layers are MoE, the expert count, top-k and weight layout are read from the loaded model
(the experts modules carry transformers' `use_experts_implementation` layout flags), so a spec
only says what cannot be derived: how the router scores, the shared expert, the attention
variant, the config field that switches renormalisation, and a tiny config for the tests.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ..errors import UnsupportedModelError


class Routing(str, enum.Enum):
    """How router logits become (expert ids, weights). The router itself stays ordinary traced ops;
    this is recorded in the manifest and is what a fused lowering must reproduce."""

    NONE = "none"  # dense model: no router
    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, then top-k (renormalise per config)
    TOPK_SOFTMAX = "topk_softmax"  # top-k of the logits, then softmax over those k
    # softmax, then top-k among the `topk_group` groups with the best expert (`topk_method`
    # "group_limited_greedy"; plain top-k for "greedy"), times `routed_scaling_factor`
    SOFTMAX_GROUP_TOPK = "softmax_group_topk"
    # sigmoid scores; choice by score + `e_score_correction_bias` among the `topk_group` groups whose
    # best two sum highest; weights are the sigmoid scores (renormalised per config) times
    # `routed_scaling_factor`
    SIGMOID_GROUP_TOPK = "sigmoid_group_topk"
    # Phi-MoE's eval path: top-2, each weight a softmax over the experts within a relative
    # `router_jitter_noise` margin of that round's best (the first winner masked in round two)
    SPARSEMIXER = "sparsemixer"


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    model_type: str
    routing: Routing
    attention: str  # documentation of the attention variant, e.g. "gqa", "gqa+qk_norm"
    tiny_config: dict[str, Any]  # a tiny test/demo config (random weights)
    renormalize_field: str | None = None  # config field that turns on top-k renormalisation
    renormalize_default: bool = False  # value when the config lacks that field
    shared_expert: str | None = None  # "sigmoid_gated" or "ungated" where the family has one
    experts_gate: str | None = None  # the gated unit its experts class overrides, one of experts_op.GATES
    routing_fields: tuple[str, ...] = ()  # config fields that parameterise the routing (recorded in the manifest)
    complex_rope: bool = False  # RoPE computed in complex numbers: captured in real arithmetic instead
    examples: tuple[str, ...] = ()  # checkpoints of this family, for the docs
    min_transformers: str = "5.17"
    # why ONNX Runtime's in-place form (GroupQueryAttention, one MoE node per layer) cannot serve the family
    ort_form_blocker: str | None = None

    def derive(self, **changes: Any) -> FamilySpec:
        """A related family that differs only in the given fields (optimum's inherit-and-override)."""
        return dataclasses.replace(self, **changes)

    def renormalize(self, config: Any) -> bool:
        if self.renormalize_field is None:
            return self.renormalize_default
        return bool(getattr(config, self.renormalize_field, self.renormalize_default))

    def ort_form_reason(self, config: Any) -> str | None:
        """None where the ort form serves this family and config, else why not (manifest and build log)."""
        if self.ort_form_blocker:
            return self.ort_form_blocker
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return "sliding-window layers are not in the ort form yet"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor",
                                                                     getattr(config, "partial_rotary_factor", 1.0))
        half = int(head_dim * factor) // 2
        if half % 8:
            return (f"GroupQueryAttention rotates in halves that are multiples of 8; this model's rotary "
                    f"dimension is {2 * half}")
        return None

    def describe(self, config: Any) -> dict[str, Any]:
        """The manifest's `family` entry: what a runtime or a fused lowering must reproduce."""
        return {
            "model_type": self.model_type,
            "routing": self.routing.value,
            "renormalize": self.renormalize(config),
            "routing_options": {name: getattr(config, name, None) for name in self.routing_fields},
            "attention": self.attention,
            "shared_expert": self.shared_expert,
            "experts_gate": self.experts_gate,
        }


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    FAMILIES[spec.model_type] = spec
    return spec


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def families_table() -> str:
    """The supported-families table of README.md and docs/FAMILIES.md (`moe-compile families --markdown`);
    a test checks that both carry it verbatim."""
    rows = ["| model_type | routing | renormalise | shared expert | experts gate | attention | e.g. |", "|---|---|---|---|---|---|---|"]
    for name in supported_families():
        spec = FAMILIES[name]
        renorm = spec.renormalize_field or ("always" if spec.renormalize_default else "no")
        rows.append(
            f"| `{name}` | {spec.routing.value} | {renorm} | {spec.shared_expert or '-'} | {spec.experts_gate or '-'} "
            f"| {spec.attention} | {', '.join(spec.examples) or '-'} |"
        )
    return "\n".join(rows) + "\n"


def family_for(model_type: str) -> FamilySpec:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}'; supported families: {', '.join(supported_families())}"
        ) from None
