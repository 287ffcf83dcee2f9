"""Quantize an exported model's weights in place, one initializer at a time (onnx_ir); the codes and scales of
both forms are lazy constants, quantized as the file is written.

ort form (ONNX Runtime's contrib ops, after export/ort_fusions.py):

    MoE(x, logits, fc1 [E,2I,H], -, fc2 [E,H,I])     ─▶ QMoE(x, logits, fc1 codes [E,2I,H·b/8], fc1 scales [E,2I,H/B],
                                                              -, fc2 codes [E,H,I·b/8], fc2 scales [E,H,I/B];
                                                              expert_weight_bits=b, block_size=B, + MoE's attributes)
    MatMul(x, W [K,N]) | Gemm(x, W [N,K], transB=1)  ─▶ MatMulNBits(x, codes [N,K/B,B·b/8], scales [N,K/B][, bias];
                                                              accuracy_level: ACCURACY_LEVEL)

portable form (standard ops, opset 21; TensorRT reads it):

    W [..., K, ...] float  ─▶  DequantizeLinear(q int4|int8 [same shape], scales [K/B on the K axis],
                                                axis=K axis, block_size=B) ─▶ the same consumers
    (MatMul right operand: K = rows; Gemm transB: K = columns; the MoE lowerings' experts [E, N, K],
    read by Gather or as MatMul's left operand: K = last)

Which weights: the class of the module that reads them (`weight_class` of torch.onnx's name scopes,
which export/ort_fusions.py's packs carry over). Anything not recognised stays as it is, named in the
report's `unquantized` with the reason: a build never quantizes part of a class silently.
"""

from __future__ import annotations

import ast
import logging
from collections import defaultdict

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from . import QUANTIZED, Quantization, weight_class
from .packing import matmul_nbits_weights, qmoe_weights, quantize_rows

log = logging.getLogger("moe_compile.quantize")
SCOPES = "pkg.torch.onnx.name_scopes"
DQ_OPSET = 21  # DequantizeLinear with block_size
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def node_weight_class(node: ir.Node) -> str | None:
    """The weight class of the module a node was exported from (None: no name scopes recorded)."""
    scopes = node.metadata_props.get(SCOPES)
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    return weight_class(names[-2]) if len(names) >= 2 else None  # the last scope is the op itself


def quantizable(node: ir.Node) -> bool:
    """Whether a node's weight is of a class some quantized build quantizes (export/ort_fusions.py packs
    only weights that agree on this)."""
    return node_weight_class(node) in (*QUANTIZED, "lm_head")


def _weights(graph: ir.Graph) -> list[ir.Value]:
    return [v for v in graph.initializers.values() if v.const_value is not None and v.dtype in FLOATS
            and v.shape is not None and len(v.shape) >= 2]


def bytes_by_class(model: ir.Model) -> dict[str, int]:
    """Initializer bytes per weight class of their readers (unclassified readers: "other")."""
    totals: dict[str, int] = defaultdict(int)
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        classes = {node_weight_class(use.node) for use in value.uses()} - {None}
        totals[min(classes) if len(classes) == 1 else "other"] += value.const_value.nbytes
    return dict(totals)


# TensorRT-RTX 1.7.1 aborts the process (segfault, CPU build) on an int4 block-quantized 3-D DequantizeLinear
# (the experts [E, N, K] of the portable lowerings); 2-D int4 and 3-D int8 build. Where an engine is built, int4
# experts keep their int4 codes and scales in int8 storage: the same dequantized values, 2x their bytes.
INT4_EXPERTS_IN_INT8 = "TensorRT-RTX 1.7.1 aborts building an engine from int4 3-D DequantizeLinear weights"


# accuracy_level of the ort form's ops: 4 (int8 activations, rounded per block of the weights' block size, in int8
# dot products) at both widths, the scheme of llama.cpp's q8_0 and q4_0 (whose dot products take q8_0 activations).
# onnxruntime's CPU provider reads it; its CUDA kernels do not (the onnxruntime-gpu 1.31.1 CUDA library holds no
# "accuracy_level" string: fp16/bf16 activations there). Measured on this project's CPU benchmark (qwen2-moe-bench,
# onnxruntime 1.32, docs/QUANTIZATION.md): 8 bits at level 0, MatMulNBits dequantizes its whole weight to fp32 on every
# call (2.6-4.1 tok/s decode; QMoE's 8-bit experts have no fp32 kernel and round activations at every level); 4 bits,
# level 4 on both ops decodes ~30% faster than level 0 (level 4 on either op alone: no gain). The build's check runs
# the same ops on float activations (quantize/exact.py), so graph and packing stay exactly checked.
ACCURACY_LEVEL = {8: 4, 4: 4}
ACCURACY_WHY = ("int8 activations (accuracy_level 4) in MatMulNBits and QMoE, as llama.cpp's q8_0/q4_0 dot products: "
                "onnxruntime 1.32's CPU 8-bit MatMulNBits at level 0 dequantizes its whole weight every call and its 8-bit "
                "QMoE has no fp32 kernel; 4-bit decodes ~30% faster at level 4 (docs/QUANTIZATION.md). The CUDA provider "
                "ignores accuracy_level (fp16/bf16 activations)")


def quantize_model(model: ir.Model, quantization: Quantization, form: str, engine: bool = False) -> dict:
    """Rewrite `model` (ort or portable form); returns the manifest's quantization record. `engine`: a
    TensorRT engine will be built from it (portable form: int4 experts stored as int8, INT4_EXPERTS_IN_INT8)."""
    before = bytes_by_class(model)
    unquantized: dict[str, str] = {}
    if form == "ort":
        ops = _quantize_ort(model.graph, quantization, unquantized)
    else:
        ops = _quantize_portable(model, quantization, unquantized, wide_experts=engine)
    RemoveUnusedNodesPass()(model)
    after = bytes_by_class(model)
    record = quantization.record()
    if ops.get("int4_in_int8"):
        record["int4_in_int8"] = INT4_EXPERTS_IN_INT8
    if form == "ort":
        record["accuracy_level"] = ACCURACY_LEVEL[quantization.bits]
        record["accuracy_level_reason"] = ACCURACY_WHY
    record.update(ops=ops, unquantized=unquantized,
                  bytes={c: {"before": before.get(c, 0), "after": after.get(c, 0)} for c in sorted({*before, *after})})
    log.info("[quantize] %s: %s", quantization.scheme, ", ".join(f"{k}={v}" for k, v in ops.items()))
    if unquantized:  # never silently: the manifest lists each, and the build says how many
        log.warning("quantize: %d weights of quantized classes left in the build's dtype (manifest.quantization"
                    ".unquantized), e.g. %s: %s", len(unquantized), *next(iter(unquantized.items())))
    return record


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _lazy_pair(graph: ir.Graph, compute, specs) -> tuple[ir.Value, ir.Value]:
    """Two initializers, specs ((name, dtype, shape), ...), that one call of `compute()` makes, lazy: computed as
    the file is written, so that an export holds one weight's codes at a time, not the model's
    (docs/QUANTIZATION.md). The part read second waits in `held`: onnx-ir 1.1 writes the pair one after the other (in
    declaration order); 1.0 wrote by size, all scales first, so that every weight's codes waited at once."""
    held = {}

    def read(part: int) -> ir.Tensor:
        if part not in held:
            held.update(enumerate(compute()))
        return ir.tensor(np.ascontiguousarray(held.pop(part)))

    values = []
    for part, (name, dtype, shape) in enumerate(specs):
        values.append(ir.Value(name=name, const_value=ir.LazyTensor(lambda part=part: read(part), dtype=dtype,
                                                                     shape=ir.Shape(shape))))
        graph.register_initializer(values[-1])
    return values[0], values[1]


def _quantized_initializers(graph: ir.Graph, name: str, rows, dtype: ir.DataType, lead: list[int], n: int, k: int,
                            quantization: Quantization, qmoe: bool) -> tuple[ir.Value, ir.Value]:
    """The codes and scales of `rows()` ([*lead, n, k] in `dtype`) as QMoE's or MatMulNBits' initializers
    `{name}.q{bits}` and `{name}.scales`, lazy (_lazy_pair), one quantization for both."""
    bits, block = quantization.bits, quantization.block_size

    def compute():
        q = quantize_rows(rows(), bits, block, dtype.numpy())
        return qmoe_weights(q) if qmoe else matmul_nbits_weights(q)

    codes_shape = [*lead, n, k * bits // 8] if qmoe else [n, k // block, block * bits // 8]
    return _lazy_pair(graph, compute, ((f"{name}.q{bits}", ir.DataType.UINT8, codes_shape),
                                       (f"{name}.scales", dtype, [*lead, n, k // block])))


def _dequantize_linear_initializers(graph: ir.Graph, value: ir.Value, axis: int, bits: int, block: int,
                                    in_int8: bool) -> tuple[ir.Value, ir.Value]:
    """DequantizeLinear's codes (int4, or int8 where `in_int8`, the weight's shape) and scales (its dtype, K / block
    on the K axis) of the weight `value`, K along `axis`, lazy (_lazy_pair): read from the weight as the file is
    written."""
    weight = value.const_value

    def compute():
        w = weight.numpy()
        q = quantize_rows(np.moveaxis(w, axis, -1), bits, block, w.dtype)
        codes = np.moveaxis(q.unpacked(), -1, axis).astype(ml_dtypes.int4 if bits == 4 and not in_int8 else np.int8)
        return codes, np.moveaxis(q.scales, -1, axis)

    shape = list(weight.shape)
    scales_shape = shape[:axis] + [shape[axis] // block] + shape[axis + 1:]
    codes_dtype = ir.DataType.INT4 if bits == 4 and not in_int8 else ir.DataType.INT8
    return _lazy_pair(graph, compute, ((f"{value.name}.q{bits}", codes_dtype, shape),
                                       (f"{value.name}.scales", weight.dtype, scales_shape)))


def _quantize_ort(graph: ir.Graph, quantization: Quantization, unquantized: dict[str, str]) -> dict[str, int]:
    counts = {"QMoE": 0, "MatMulNBits": 0}
    bits, block = quantization.bits, quantization.block_size
    level = ACCURACY_LEVEL[bits]
    for node in list(graph):
        cls = node_weight_class(node)
        if node.op_type == "MoE" and node.domain == "com.microsoft":
            moe_in = [*node.inputs, *[None] * (8 - len(node.inputs))]
            fc1, fc2 = moe_in[2], moe_in[4]
            if not _constant(fc1) or not _constant(fc2) or any(v is not None for v in moe_in[6:]):
                unquantized[node.name] = "MoE weights are not constants in the fc1/fc2 form"
                continue
            (e, n1, k1), (_, n2, k2) = fc1.const_value.shape, fc2.const_value.shape
            if k1 % block or k2 % block:
                unquantized[node.name] = f"expert K ({k1}, {k2}) not a multiple of {block}"
                continue
            name = node.name
            w1, s1 = _quantized_initializers(graph, f"{name}.fc1", fc1.const_value.numpy, fc1.const_value.dtype, [e], n1,
                                             k1, quantization, qmoe=True)
            w2, s2 = _quantized_initializers(graph, f"{name}.fc2", fc2.const_value.numpy, fc2.const_value.dtype, [e], n2,
                                             k2, quantization, qmoe=True)
            inputs = [moe_in[0], moe_in[1], w1, s1, moe_in[3], w2, s2, moe_in[5]]
            if "normalize_routing_weights" in node.attributes and not node.attributes["normalize_routing_weights"].value:
                # onnxruntime 1.32's CPU QMoE renormalises the top-k weights even with normalize_routing_weights=0
                # (measured; its MoE does not): the op's router_weights input, the softmax, gives the weights as they are
                softmax = ir.Node("", "Softmax", [moe_in[1]], attributes=[ir.AttrInt64("axis", -1)], name=f"{name}_probs",
                                  metadata_props=dict(node.metadata_props))
                graph.insert_before(node, softmax)
                softmax.outputs[0].name = f"{name}_probs_out"
                inputs += [None] * 6 + [softmax.outputs[0]]  # fc3 weights/scales/bias, 3 zero points, router_weights
            attrs = [*node.attributes.values(), ir.AttrInt64("expert_weight_bits", bits), ir.AttrInt64("block_size", block),
                     ir.AttrInt64("accuracy_level", level),
                     ir.AttrInt64("weights_prepacked", 0)]  # the raw [E, N, K·b/8] codes (CUDA's default -1: CUTLASS's)
            _replace(graph, node, ir.Node("com.microsoft", "QMoE", inputs, attributes=attrs, name=f"{name}_q{bits}",
                                          metadata_props=dict(node.metadata_props)))
            counts["QMoE"] += 1
        elif node.op_type in ("MatMul", "Gemm") and cls is not None and quantization.quantizes(cls):
            rows, (n, k), bias, why = _matmul_rows(node)
            if rows is None:
                unquantized[node.name] = why
                continue
            if k % block:
                unquantized[node.name] = f"K={k} is not a multiple of the block size {block}"
                continue
            name = node.name
            codes, scales = _quantized_initializers(graph, name, rows, node.inputs[1].const_value.dtype, [], n, k,
                                                    quantization, qmoe=False)
            add = None
            if bias is None and (found := _bias_add(node, n)):
                add, bias = found
            inputs = [node.inputs[0], codes, scales]
            if bias is not None:
                inputs += [None, None, bias]
            attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits), ir.AttrInt64("block_size", block),
                     ir.AttrInt64("accuracy_level", level)]
            quantized = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=attrs, name=f"{name}_q{bits}",
                                metadata_props=dict(node.metadata_props))
            _replace(graph, node, quantized)
            if add is not None:  # it now adds the bias to the quantized product: its readers take that instead
                add.outputs[0].replace_all_uses_with(quantized.outputs[0])
                graph.remove(add, safe=True)
            counts["MatMulNBits"] += 1
    return counts


def _matmul_rows(node: ir.Node):
    """(a function giving the weight as rows [N, K], (N, K), 1-D bias value or None, why not) of a MatMul/Gemm by a
    constant; the rows are read when the function is called (as the file is written)."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if weight is None or len(weight.shape) != 2:
        return None, (0, 0), None, "the weight is not a constant matrix"
    k, n = weight.shape  # MatMul's [K, N], or Gemm's without transB
    columns = lambda: np.ascontiguousarray(weight.numpy().T)  # noqa: E731
    if node.op_type == "MatMul":
        return columns, (n, k), None, ""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None, (0, 0), None, "Gemm with transA, alpha or beta"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and (bias.const_value is None or len(bias.shape) != 1):
        return None, (0, 0), None, "Gemm bias is not a constant vector"
    return (weight.numpy, (k, n), bias, "") if attrs.get("transB", 0) else (columns, (n, k), bias, "")


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """(the Add, its bias) where an Add of a constant [N] vector is the only reader of a MatMul's output (the ort
    form adds q/k/v's packed bias after the MatMul), which MatMulNBits' bias input takes in: one node a layer less."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx") \
            or node.outputs[0].is_graph_output() or uses[0].node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if not _constant(bias) or list(bias.const_value.shape) != [n] \
            or bias.const_value.dtype != node.inputs[1].const_value.dtype:
        return None
    return add, bias


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Swap `old` for `new` and free the float weights nothing reads any more (streaming: one layer's
    float and quantized weights at a time, not the whole model's twice)."""
    graph.insert_before(old, new)
    out = old.outputs[0]
    new.outputs[0].name = f"{new.name}_out"
    if out.type is not None:
        new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    inputs = [v for v in old.inputs if v is not None and v.is_initializer()]
    graph.remove(old, safe=True)
    for value in inputs:
        if not list(value.uses()):
            del graph.initializers[value.name]


def _k_axis(use: ir.Usage, rank: int) -> int | None:
    """The input-feature axis of a weight for one of its readers, or None for a reader we do not know."""
    node, idx = use.node, use.idx
    if node.op_type == "MatMul":
        return rank - 2 if idx == 1 else rank - 1  # x @ W, or the dense lowering's W @ xᵀ
    if node.op_type == "Gemm" and idx == 1 and rank == 2:
        return 1 if node.attributes.get("transB") is not None and node.attributes["transB"].value else 0
    if node.op_type in ("Gather", "GatherND") and idx == 0 and rank == 3:
        return 2  # the gather lowering's experts [E, N, K], gathered by expert then multiplied as [.., N, K] @ x
    return None


def _quantize_portable(model: ir.Model, quantization: Quantization, unquantized: dict[str, str],
                       wide_experts: bool = False) -> dict[str, int]:
    graph = model.graph
    bits, block = quantization.bits, quantization.block_size
    count = wide = 0
    for value in _weights(graph):
        uses = list(value.uses())
        classes = {node_weight_class(u.node) for u in uses}
        if not uses or not all(c is not None and quantization.quantizes(c) for c in classes):
            if any(c is not None and quantization.quantizes(c) for c in classes):
                unquantized[value.name] = f"read by classes {sorted(map(str, classes))}"
            continue
        rank = len(value.shape)
        axes = {_k_axis(u, rank) for u in uses}
        if len(axes) != 1 or None in axes:
            unquantized[value.name] = f"readers {sorted({u.node.op_type for u in uses})} with no single K axis"
            continue
        axis = axes.pop()
        if value.const_value.shape[axis] % block:
            unquantized[value.name] = f"K={value.const_value.shape[axis]} is not a multiple of the block size {block}"
            continue
        in_int8 = bits == 4 and wide_experts and rank == 3
        wide += in_int8
        name = value.name
        q_value, s_value = _dequantize_linear_initializers(graph, value, axis, bits, block, in_int8)
        dq = ir.Node("", "DequantizeLinear", [q_value, s_value], name=f"{name}.dequantize",
                     attributes=[ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", block)],
                     metadata_props=dict(uses[0].node.metadata_props))
        graph.insert_before(graph.node(0), dq)
        dq.outputs[0].shape, dq.outputs[0].dtype, dq.outputs[0].name = value.shape, value.dtype, f"{name}.dequantized"
        value.replace_all_uses_with(dq.outputs[0])
        del graph.initializers[name]
        count += 1
    if count:
        model.opset_imports[""] = max(model.opset_imports.get("", 0), DQ_OPSET)
    return {"DequantizeLinear": count, **({"int4_in_int8": wide} if wide else {})}
