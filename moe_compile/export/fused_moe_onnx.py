"""ONNX translation of `moe_compile::fused_moe` (plugins/fused_op.py): one `com.microsoft:MoE`
node, which ONNX Runtime runs natively (CPU and CUDA providers) and whose op name is what the
TensorRT plugin (plugins/trt_plugin.py) registers under.

    hidden [T,H] ───────────────────────────────────────────────▶ MoE(k, normalize_routing_weights,
    router_logits [T,E] ─CastLike(hidden)───────────────────────▶     activation_type=swiglu,
    gate_up [E,2I,H] ─Reshape [E,2,I,H]─Transpose─Reshape [E,2I,H]▶     swiglu_fusion=1, alpha, beta
    down [E,H,I] ────────────────────────────────────────────────▶     [, swiglu_limit]) ─▶ [T,H]

The MoE contract (onnxruntime 1.32, checked by running it): `router_probs` are the router
*logits* (the op applies softmax, top-k, and renormalises when asked); fc1 [E, 2I, H] and fc2
[E, H, I] hold rows as nn.Linear does, our canonical layout; with swiglu_fusion=1 the gate and up
rows of fc1 are interleaved (g0, u0, g1, u1, ...), the only fused layout its CPU kernel accepts
(swiglu_fusion=2, concatenated, is refused there). The interleave is ops on the weight
initializer, folded into a constant by the exporter's optimiser or at session start.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import opset18 as op

from ..plugins.fused_op import moe_attributes



def _moe_schema() -> onnx.defs.OpSchema:
    """com.microsoft:MoE's signature as onnxruntime 1.32 registers it (onnx has no schemas for ORT's
    contrib ops; the exporter needs one to tell inputs from attributes). Not registered globally."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    inputs = [P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
              P("fc1_experts_bias", "T", param_option=optional), P("fc2_experts_weights", "T"),
              P("fc2_experts_bias", "T", param_option=optional), P("fc3_experts_weights", "T", param_option=optional),
              P("fc3_experts_bias", "T", param_option=optional)]
    kind = onnx.defs.OpSchema.AttrType
    attributes = [A("k", kind.INT, ""), A("normalize_routing_weights", kind.INT, ""),
                  A("use_sparse_mixer", kind.INT, ""), A("swiglu_fusion", kind.INT, ""),
                  A("activation_type", kind.STRING, ""), A("activation_alpha", kind.FLOAT, ""),
                  A("activation_beta", kind.FLOAT, ""), A("swiglu_limit", kind.FLOAT, "")]
    return onnx.defs.OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[P("output", "T")],
                              type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                              attributes=attributes)


MOE = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _moe_schema())


def interleave_rows(gate_up, rank: int):
    """[E, 2I(, H)] gate rows then up rows -> rows g0, u0, g1, u1, ... (rank 3: weights, 2: bias).
    Weights have static shapes, so the Reshapes take constants."""
    experts, two_i, *rest = gate_up.shape
    split = op.Reshape(gate_up, op.Constant(value_ints=[experts, 2, two_i // 2, *rest]))  # [E, 2, I(, H)]
    swapped = op.Transpose(split, perm=[0, 2, 1, 3][:rank + 1])  # [E, I, 2(, H)]
    return op.Reshape(swapped, op.Constant(value_ints=[experts, two_i, *rest]))


def fused_moe(hidden, router_logits, gate_up_proj, down_proj, top_k: int, renormalize: bool, activation: str,
              gate_up_bias=None, down_bias=None, alpha: float = 1.0, limit: float | None = None):
    attributes = moe_attributes(activation, alpha, limit)
    if attributes is None:  # the fused pass lowers such layers to `auto` instead
        raise ValueError(f"fused_moe: activation '{activation}' has no com.microsoft:MoE form")
    fc1_bias = None if gate_up_bias is None else interleave_rows(gate_up_bias, 2)
    return MOE(
        hidden,
        op.CastLike(router_logits, hidden),  # the op takes one element type for input and router
        interleave_rows(gate_up_proj, 3),
        fc1_bias,
        down_proj,
        down_bias,
        k=top_k,
        normalize_routing_weights=int(renormalize),
        use_sparse_mixer=0,
        swiglu_fusion=1,
        **attributes,
    )


# torch.onnx.export(custom_translation_table=...): our ops -> their ONNX form.
TRANSLATIONS = {torch.ops.moe_compile.fused_moe.default: fused_moe}
