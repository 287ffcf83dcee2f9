"""The MoE experts as one registered custom op, plugged in through transformers' own extension point.

transformers 5.x dispatches every decorated experts class through `ExpertsInterface`, keyed by
`config._experts_implementation`. We register `"moe_compile"` there: its forward calls
`torch.ops.moe_compile.experts`, an opaque op that `torch.export` keeps as one node per MoE layer.
The router before it stays ordinary traced ops; the passes lower the op afterwards.

Weights enter the op in one canonical layout whatever the family stores: `gate_up [E, 2I, H]`
(gate rows first, then up rows) and `down [E, H, I]`, with optional biases `[E, 2I]`, `[E, H]`.
Layout changes are traced ops on the parameters, which the ONNX exporter folds into constants.
A class that overrides transformers' gate function (`_apply_gate`) is supported when its family
spec names that gate (`FamilySpec.experts_gate`, one of GATES); the op then carries the gate's
name as its activation and its parameters (`alpha`, `limit`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.integrations.moe import _default_apply_gate

from ..errors import UnsupportedModelError

IMPLEMENTATION = "moe_compile"

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Gated units other than `act(gate) * up`, by the name a family gives its experts class's `_apply_gate`
# (FamilySpec.experts_gate), each with how to read its parameters off the experts module.
# "swiglu_oai" is GPT-OSS's clamped SwiGLU:
#   gate = min(gate, limit); up = clamp(up, -limit, limit); out = (up + 1) * gate * sigmoid(alpha * gate)
GATES = {
    "swiglu_oai": lambda m: {"alpha": float(m.alpha), "limit": None if m.limit is None else float(m.limit)},
}


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = 1.0, limit: float | None = None):
    """The experts' gated unit on the split halves of the gate/up projection."""
    if activation == "swiglu_oai":
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return ACTIVATIONS[activation](gate) * up


@torch.library.custom_op("moe_compile::experts", mutates_args=())
def experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    limit: float | None = None,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * (down[e] @ glu(gate, up) + down_bias[e]), e = top_k_index[t,j], where
    [gate; up] = gate_up[e] @ x[t] + gate_up_bias[e] (gate rows first) and glu is `act(gate) * up`
    for an activation name, or the gated unit named by `activation` in GATES with `alpha`/`limit`.
    Biases are optional ([E, 2I] and [E, H]); `alpha` and `limit` only apply to GATES."""
    from ..passes.gather import gather_experts

    return gather_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation,
                          gate_up_bias, down_bias, alpha, limit)


@experts.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias=None,
      down_bias=None, alpha=1.0, limit=None):
    return torch.empty_like(hidden_states)


def _experts_forward(module: torch.nn.Module, hidden_states, top_k_index, top_k_weights):
    """The forward registered in `ExpertsInterface`: canonicalise the layout, call the op."""
    gate_up, down, gate_up_bias, down_bias = canonical_weights(module)
    activation, params = activation_of(module)
    return torch.ops.moe_compile.experts(hidden_states, top_k_index, top_k_weights, gate_up, down, activation,
                                         gate_up_bias, down_bias, **params)


def activation_of(module: torch.nn.Module) -> tuple[str, dict]:
    """(activation name, its alpha/limit) for an experts module: the family's declared gate when the
    class overrides `_apply_gate`, else the config's `hidden_act`."""
    gate = _family_gate(module)
    if gate is not None:
        return gate, GATES[gate](module)
    return module.config.hidden_act, {}


def _family_gate(module: torch.nn.Module) -> str | None:
    from ..models import FAMILIES

    spec = FAMILIES.get(getattr(module.config, "model_type", None))
    return spec.experts_gate if spec is not None else None


def canonical_weights(module: torch.nn.Module):
    """Return (gate_up [E, 2I, H], down [E, H, I], gate_up_bias [E, 2I] | None, down_bias [E, H] | None)
    or raise naming what the op cannot express."""
    name = type(module).__name__
    custom_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate
    gate = _family_gate(module)
    unsupported = [
        flag
        for flag, bad in (
            ("no gate projection", not getattr(module, "has_gate", True)),
            ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
            ("a custom gate function", custom_gate and gate is None),
            (f"an unknown gate '{gate}' (known: {', '.join(GATES)})", gate is not None and gate not in GATES),
        )
        if bad
    ]
    if unsupported:
        raise UnsupportedModelError(f"{name}: experts with {', '.join(unsupported)} are not supported yet")
    if gate is None and module.config.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{name}: expert activation '{module.config.hidden_act}' is not supported")
    gate_up, down = module.gate_up_proj, module.down_proj
    has_bias = getattr(module, "has_bias", False)
    gate_up_bias = module.gate_up_proj_bias if has_bias else None
    down_bias = module.down_proj_bias if has_bias else None
    if getattr(module, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if not getattr(module, "is_concatenated", True):  # interleaved [g0, u0, g1, u1, ...]
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        if gate_up_bias is not None:
            gate_up_bias = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
    return gate_up, down, gate_up_bias, down_bias


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, _experts_forward)


_register()


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The experts modules that dispatch through ExpertsInterface, by qualified name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "is_concatenated") and hasattr(m, "down_proj")}


@contextlib.contextmanager
def traceable(model: torch.nn.Module, attention_implementation: str | None = None):
    """Scoped: route the model's experts through our op and its attention through our branch-free
    function (or `attention_implementation`); restore the previous implementations after."""
    from . import attention

    modules = experts_modules(model)
    for module in modules.values():
        canonical_weights(module)  # fail before tracing, naming the layer's class
    configs = {id(m.config): m.config for m in [model, *modules.values()]}
    previous = {key: (c._experts_implementation, c._attn_implementation) for key, c in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = attention_implementation or attention.IMPLEMENTATION
        for module in modules.values():
            module.config._experts_implementation = IMPLEMENTATION
        yield modules
    finally:
        for key, config in configs.items():
            config._experts_implementation, config._attn_implementation = previous[key]
