"""The ort form's ONNX clean-ups: fewer, larger kernels per layer. Each rule returns how many times it
applied; `fuse_for_ort` runs them in order and logs the counts.

- `rms_norm`, `skip_rms_norm`: transformers' RMSNorm (pow, mean, rsqrt, mul) and the residual Add before
  it -> SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (onnxscript's ort_fusions rules).
- `skip_layer_norm`: the same for LayerNorm families (PhiMoE): the residual Add and LayerNormalization
  -> com.microsoft:SkipLayerNormalization.
- `no_op_reshapes`: a chain of Reshapes that ends in its input's shape (HF's `view(B, S, N, D)` undone by
  the attention's `reshape(B, S, N·D)`) -> nothing.
- `silu`: x · Sigmoid(x) (torch.onnx's SiLU) -> com.microsoft:QuickGelu(alpha=1), one kernel.
- `packed_matmuls`: MatMuls (or Gemms) of one activation by constant weights (q/k/v projections; a shared
  expert's gate and up; its gate scalar and the router) -> one MatMul over the concatenated weights, a
  bias Add if they all had one, and one Split; aligned widths and odd ones in separate packs.
- `packed_qkv`: GroupQueryAttention reading the three outputs of one such Split as query, key, value ->
  GroupQueryAttention on the packed tensor (its packed-QKV input).
- `folded_weights`: Reshape/Transpose chains over a constant (the MoE node's gate/up interleave) -> a
  constant, computed once when the model is written instead of at every session start.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

log = logging.getLogger("moe_compile.export")
ALIGN = 64  # weights whose widths are multiples of this pack together, the others apart


RULES = {
    "rms_norm": lambda model: rms_normalization.fuse_rms_normalization(model),
    "skip_rms_norm": lambda model: skip_normalization.fuse_skip_rms_normalization(model),
    "skip_layer_norm": lambda model: skip_normalization.fuse_skip_layer_normalization(model),
    "no_op_reshapes": lambda model: remove_no_op_reshapes(model.graph),
    "silu": lambda model: silu_as_quick_gelu(model.graph),
    "packed_matmuls": lambda model: pack_matmuls(model.graph),
    "packed_qkv": lambda model: pack_qkv(model.graph),
    "folded_weights": lambda model: fold_constant_layouts(model.graph),
}


def fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """Apply RULES in order, dropping what each left unused before the next looks at the uses."""
    counts = {}
    for name, rule in RULES.items():
        counts[name] = rule(model)
        RemoveUnusedNodesPass()(model)
    log.info("[export] ort fusions: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(isinstance(x, int) and x == y or isinstance(x, ir.SymbolicDim) and x.value and x == y
               for x, y in zip(a.shape, b.shape))


def remove_no_op_reshapes(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        out = node.outputs[0] if node.op_type == "Reshape" else None
        if out is None or out.is_graph_output():
            continue
        source = node.inputs[0]
        while not _same_shape(source, out) and source.producer() is not None and source.producer().op_type == "Reshape":
            source = source.producer().inputs[0]
        if _same_shape(source, out):
            out.replace_all_uses_with(source)
            count += 1
    return count


def silu_as_quick_gelu(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        if node.op_type != "Sigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        x, sigmoid = node.inputs[0], node.outputs[0]
        for use in list(sigmoid.uses()):
            mul = use.node
            if mul.op_type != "Mul" or mul.inputs[1 - use.idx] is not x:
                continue
            gelu = ir.Node("com.microsoft", "QuickGelu", [x], attributes=[ir.AttrFloat32("alpha", 1.0)],
                           name=f"{mul.name}_silu")
            graph.insert_before(mul, gelu)
            gelu.outputs[0].shape, gelu.outputs[0].dtype = mul.outputs[0].shape, mul.outputs[0].dtype
            mul.outputs[0].replace_all_uses_with(gelu.outputs[0], replace_graph_outputs=True)
            count += 1
    return count


def _weight(node: ir.Node) -> np.ndarray | None:
    """The constant right-hand weight of a MatMul, or of a plain Gemm (as [in, out])."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    w = node.inputs[1].const_value.numpy()
    if w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return w
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if node.op_type == "Gemm" and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and (
            len(node.inputs) < 3 or node.inputs[2] is None):
        return w.T if attrs.get("transB", 0) else w
    return None


def _bias(node: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """The Add of a constant 1-D bias that is the MatMul's only consumer, if any."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    if other is None or other.const_value is None or other.const_value.numpy().ndim != 1:
        return None
    return add, other.const_value.numpy()


def pack_matmuls(graph: ir.Graph) -> int:
    # A pack whose width is not a multiple of ALIGN packs its aligned widths apart from the others: on the H200, cuBLAS ran Qwen2-MoE's
    # router (60) + shared gate (1) + shared gate/up (2 x 5632) as one odd-width GEMV at a third of the
    # bandwidth (38 us a layer against ~14 us for an aligned width), and zero-padding the width instead
    # made a 5-output Split that copied its arguments to the device every run (measured, docs/BENCHMARKS.md).
    # A router or gate and a projection never share a pack: a quantized build (moe_compile/quantize/)
    # quantizes one and not the other; the pack keeps its first node's name scopes (what it reads them by).
    from ..quantize.onnx_rewrite import quantizable

    found = defaultdict(list)
    for node in graph:
        if node.op_type in ("MatMul", "Gemm") and _weight(node) is not None:
            found[(id(node.inputs[0]), _bias(node) is not None, quantizable(node))].append(node)
    groups = []
    for (_, has_bias, _), nodes in found.items():
        if sum(_weight(n).shape[1] for n in nodes) % ALIGN == 0:
            groups.append((has_bias, nodes))
        else:
            for aligned in (True, False):
                groups.append((has_bias, [n for n in nodes if (_weight(n).shape[1] % ALIGN == 0) == aligned]))
    count = 0
    for has_bias, nodes in groups:
        if len(nodes) < 2:
            continue
        x = nodes[0].inputs[0]
        weights = [_weight(n) for n in nodes]
        first = min(nodes, key=lambda n: graph.index(n))
        name = nodes[0].name or "packed"
        packed = ir.Value(name=f"{name}.packed_weight", const_value=ir.tensor(np.concatenate(weights, axis=1)))
        graph.register_initializer(packed)
        matmul = ir.Node("", "MatMul", [x, packed], name=f"{name}_packed", metadata_props=dict(nodes[0].metadata_props))
        new = [matmul]
        outputs = [n.outputs[0] for n in nodes]
        result = matmul.outputs[0]
        if has_bias:
            biases = [_bias(n) for n in nodes]
            bias = ir.Value(name=f"{name}.packed_bias", const_value=ir.tensor(
                np.concatenate([b for _, b in biases])))
            graph.register_initializer(bias)
            add = ir.Node("", "Add", [result, bias], name=f"{name}_packed_bias")
            new.append(add)
            result = add.outputs[0]
            outputs = [a.outputs[0] for a, _ in biases]
        sizes = ir.Value(name=f"{name}.split_sizes", const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)))
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [result, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(nodes),
                        name=f"{name}_split")
        new.append(split)
        graph.insert_before(first, new)
        for old, part in zip(outputs, split.outputs):
            part.shape, part.dtype = old.shape, old.dtype
            old.replace_all_uses_with(part, replace_graph_outputs=True)
        count += 1
    return count


def pack_qkv(graph: ir.Graph) -> int:
    count = 0
    for node in graph:
        if node.op_type != "GroupQueryAttention" or node.inputs[1] is None:
            continue
        q, k, v = node.inputs[:3]
        split = q.producer()
        if (split is None or split.op_type != "Split" or len(split.outputs) != 3
                or [q, k, v] != list(split.outputs) or any(len(list(x.uses())) != 1 for x in (q, k, v))):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        count += 1
    return count


def fold_constant_layouts(graph: ir.Graph) -> int:
    """Fold Reshape/Transpose chains over constants into lazy constants: the value is computed when the model is
    written (or read), tensor by tensor, and dropped after, so the export holds no second copy of what it folds (the
    MoE experts' gate/up interleave is most of a model's weights: +1.4 GB held for a 2-layer A2.7B when eager)."""
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type not in ("Reshape", "Transpose") or node.graph is None:
                continue
            data = node.inputs[0].const_value if node.inputs[0] is not None else None
            if data is None or data.shape is None:
                continue
            dims = [int(d) for d in data.shape]
            if node.op_type == "Transpose":
                perm = node.attributes.get("perm")
                perm = list(perm.value) if perm is not None else list(reversed(range(len(dims))))
                shape = [dims[p] for p in perm]
                fold = lambda data=data, perm=perm: np.transpose(data.numpy(), perm)
            else:
                target = node.inputs[1].const_value
                if target is None or 0 in target.numpy():
                    continue
                shape = [int(d) for d in target.numpy()]
                if -1 in shape:
                    shape[shape.index(-1)] = int(np.prod(dims)) // -int(np.prod(shape))
                fold = lambda data=data, shape=shape: data.numpy().reshape(shape)
            out = node.outputs[0]
            lazy = ir.LazyTensor(lambda fold=fold: ir.tensor(np.ascontiguousarray(fold())), dtype=data.dtype,
                                 shape=ir.Shape(shape))
            value = ir.Value(name=f"{out.name}.folded", const_value=lazy)
            graph.register_initializer(value)
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            count += 1
            changed = True
    return count
