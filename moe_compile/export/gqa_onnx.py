"""ONNX translation of `moe_compile::gqa` (capture/gqa.py): one `com.microsoft:GroupQueryAttention`
node with rotary inside (do_rotary, rotate-half), the share-buffer KV cache and no packing yet
(export/ort_fusions.py packs Q, K and V into one input where they come from one MatMul).

    query [B,S,N·D] ─┐
    key [B,S,KV·D] ──┤
    value ───────────┤                                              ┌─▶ output [B,S,N·D]
    past_key/value ──┼─▶ GroupQueryAttention(num_heads, kv_num_heads, ├─▶ present_key   (= past_key's buffer)
    seqlens_k int32 ─┤       scale, do_rotary=1)                     └─▶ present_value
    total_length ────┤
    cos/sin [M,R/2] ─┘
"""

from __future__ import annotations

import onnx
import onnxscript
import torch

from ..capture import gqa as _registers_the_op  # noqa: F401


def _gqa_schema() -> onnx.defs.OpSchema:
    """com.microsoft:GroupQueryAttention's leading inputs as onnxruntime 1.30-1.32 register them (onnx has
    no schemas for ORT's contrib ops; the exporter needs one to tell inputs from attributes)."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    inputs = [P("query", "T"), P("key", "T", param_option=optional), P("value", "T", param_option=optional),
              P("past_key", "T", param_option=optional), P("past_value", "T", param_option=optional),
              P("seqlens_k", "M"), P("total_sequence_length", "M"),
              P("cos_cache", "T", param_option=optional), P("sin_cache", "T", param_option=optional)]
    kind = onnx.defs.OpSchema.AttrType
    attributes = [A("num_heads", kind.INT, ""), A("kv_num_heads", kind.INT, ""), A("scale", kind.FLOAT, ""),
                  A("do_rotary", kind.INT, ""), A("rotary_interleaved", kind.INT, "")]
    outputs = [P("output", "T"), P("present_key", "T"), P("present_value", "T")]
    return onnx.defs.OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                              type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                                ("M", ["tensor(int32)"], "")],
                              attributes=attributes)


GROUP_QUERY_ATTENTION = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention",
                                             _gqa_schema())


def gqa(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads: int, kv_heads: int,
        scale: float):
    return GROUP_QUERY_ATTENTION(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin,
                                 num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
                                 rotary_interleaved=0, _num_outputs=3)


TRANSLATIONS = {torch.ops.moe_compile.gqa.default: gqa}
