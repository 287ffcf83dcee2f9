"""The MoE experts as one registered custom op, plugged in through transformers' own extension point.

transformers 5.x dispatches every decorated experts class through `ExpertsInterface`, keyed by
`config._experts_implementation`. We register `"moe_compile"` there: its forward calls
`torch.ops.moe_compile.experts`, an opaque op that `torch.export` keeps as one node per MoE layer.
The router before it stays ordinary traced ops; the passes lower the op afterwards.

Weights enter the op in one canonical layout whatever the family stores: `gate_up [E, 2I, H]`
(gate rows first, then up rows) and `down [E, H, I]`. Layout changes are traced ops on the
parameters, which the ONNX exporter folds into constants.
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


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](x)


@torch.library.custom_op("moe_compile::experts", mutates_args=())
def experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])), e = top_k_index[t,j]."""
    from ..passes.gather import gather_experts

    return gather_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation)


@experts.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation):
    return torch.empty_like(hidden_states)


def _experts_forward(module: torch.nn.Module, hidden_states, top_k_index, top_k_weights):
    """The forward registered in `ExpertsInterface`: canonicalise the layout, call the op."""
    gate_up, down = canonical_weights(module)
    activation = module.config.hidden_act
    return torch.ops.moe_compile.experts(hidden_states, top_k_index, top_k_weights, gate_up, down, activation)


def canonical_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (gate_up [E, 2I, H], down [E, H, I]) or raise naming what the op cannot express."""
    name = type(module).__name__
    unsupported = [
        flag
        for flag, bad in (
            ("biases", getattr(module, "has_bias", False)),
            ("no gate projection", not getattr(module, "has_gate", True)),
            ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
            ("a custom gate function", getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate),
        )
        if bad
    ]
    if unsupported:
        raise UnsupportedModelError(f"{name}: experts with {', '.join(unsupported)} are not supported yet")
    if module.config.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{name}: expert activation '{module.config.hidden_act}' is not supported")
    gate_up, down = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if not getattr(module, "is_concatenated", True):  # interleaved [g0, u0, g1, u1, ...]
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    return gate_up, down


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, _experts_forward)


_register()


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The experts modules that dispatch through ExpertsInterface, by qualified name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "is_concatenated") and hasattr(m, "down_proj")}


@contextlib.contextmanager
def traceable(model: torch.nn.Module):
    """Scoped: route the model's experts through our op and its attention through our
    branch-free function; restore the previous implementations after."""
    from . import attention

    modules = experts_modules(model)
    for module in modules.values():
        canonical_weights(module)  # fail before tracing, naming the layer's class
    configs = {id(m.config): m.config for m in [model, *modules.values()]}
    previous = {key: (c._experts_implementation, c._attn_implementation) for key, c in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = attention.IMPLEMENTATION
        for module in modules.values():
            module.config._experts_implementation = IMPLEMENTATION
        yield modules
    finally:
        for key, config in configs.items():
            config._experts_implementation, config._attn_implementation = previous[key]
