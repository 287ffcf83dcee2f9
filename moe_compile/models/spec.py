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


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    model_type: str
    routing: Routing
    attention: str  # documentation of the attention variant, e.g. "gqa", "gqa+qk_norm"
    tiny_config: dict[str, Any]  # a tiny test/demo config (random weights)
    renormalize_field: str | None = None  # config field that turns on top-k renormalisation
    renormalize_default: bool = False  # value when the config lacks that field
    shared_expert: str | None = None  # "sigmoid_gated" where the family has one
    min_transformers: str = "5.17"

    def derive(self, **changes: Any) -> FamilySpec:
        """A related family that differs only in the given fields (optimum's inherit-and-override)."""
        return dataclasses.replace(self, **changes)

    def renormalize(self, config: Any) -> bool:
        if self.renormalize_field is None:
            return self.renormalize_default
        return bool(getattr(config, self.renormalize_field, self.renormalize_default))


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    FAMILIES[spec.model_type] = spec
    return spec


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str) -> FamilySpec:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}'; supported families: {', '.join(supported_families())}"
        ) from None
