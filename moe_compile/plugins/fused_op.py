"""`moe_compile::fused_moe`: the one graph node the `fused` lowering leaves per MoE layer.

    fused_moe(hidden [T,H], router_logits [T,E], gate_up_proj [E,2I,H], down_proj [E,H,I], top_k,
              renormalize, activation, gate_up_bias?, down_bias?, alpha, limit) -> [T,H]

Semantics are those of ONNX Runtime's `com.microsoft:MoE`, which the ONNX translation emits
(export/fused_moe_onnx.py): probabilities = softmax(logits) in fp32, top-k by probability,
optionally renormalised over the k; then the experts op's gated MLP (capture/experts_op.py).
Kernels: a CPU (any-device) reference in plain torch, and on CUDA our fused kernels
(plugins/torch_ops.py) where they apply: SiLU-gated, no biases; anything else stays on the reference.
The saved program.pt2 holds this op, so the torch backend must import this module before loading.
"""

from __future__ import annotations

import torch

# Experts activations com.microsoft:MoE expresses, as its attributes. ONNX Runtime's swiglu is
#   G = clamp(g, max=limit); L = clamp(l, -limit, limit); out = G * sigmoid(alpha * G) * (L + beta)
# (limit omitted = no clamp), so SiLU(g)*u is alpha=1, beta=0 and GPT-OSS's gate is beta=1.
# Its gelu/relu are ungated and its geglu is CUDA-only with the tanh GELU: no match for the rest.
SILU = ("silu", "swish")


def moe_attributes(activation: str, alpha: float = 1.0, limit: float | None = None) -> dict | None:
    """com.microsoft:MoE activation attributes for an experts activation, or None if it has none."""
    if activation in SILU:
        attrs = {"activation_type": "swiglu", "activation_alpha": 1.0, "activation_beta": 0.0}
    elif activation == "swiglu_oai":
        attrs = {"activation_type": "swiglu", "activation_alpha": float(alpha), "activation_beta": 1.0}
        if limit is not None:
            attrs["swiglu_limit"] = float(limit)
    else:
        return None
    return attrs


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T,k], weights [T,k] fp32) as com.microsoft:MoE routes."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def _reference(hidden, router_logits, gate_up_proj, down_proj, top_k, renormalize, activation, gate_up_bias,
               down_bias, alpha, limit):
    from ..passes.gather import gather_experts

    ids, weights = route(router_logits, top_k, renormalize)
    return gather_experts(hidden, ids, weights, gate_up_proj, down_proj, activation, gate_up_bias, down_bias,
                          alpha, limit)


@torch.library.custom_op("moe_compile::fused_moe", mutates_args=())
def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, top_k: int, renormalize: bool, activation: str,
              gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
              alpha: float = 1.0, limit: float | None = None) -> torch.Tensor:
    return _reference(hidden, router_logits, gate_up_proj, down_proj, top_k, renormalize, activation, gate_up_bias,
                      down_bias, alpha, limit)


@fused_moe.register_fake
def _(hidden, router_logits, gate_up_proj, down_proj, top_k, renormalize, activation, gate_up_bias=None,
      down_bias=None, alpha=1.0, limit=None):
    return torch.empty_like(hidden)


@fused_moe.register_kernel("cuda")
def _(hidden, router_logits, gate_up_proj, down_proj, top_k, renormalize, activation, gate_up_bias=None,
      down_bias=None, alpha=1.0, limit=None):
    num_experts, two_i, hidden_size = gate_up_proj.shape
    # The kernels' limits (csrc/fused_moe.h); outside them, and for what they do not compute, the reference.
    fits = hidden_size % 8 == 0 and two_i % 16 == 0 and num_experts <= 1024 and top_k <= 32
    if fits and activation in SILU and gate_up_bias is None and down_bias is None:
        from . import torch_ops  # noqa: F401  (registers fused_moe_cuda; builds the library on first use)

        # Our kernels rank by logit: the same order as by probability.
        return torch.ops.moe_compile.fused_moe_cuda(hidden.contiguous(), router_logits, gate_up_proj.contiguous(),
                                                    down_proj.contiguous(), None, top_k, renormalize)
    return _reference(hidden, router_logits, gate_up_proj, down_proj, top_k, renormalize, activation, gate_up_bias,
                      down_bias, alpha, limit)
