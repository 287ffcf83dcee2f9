"""Which ops of a fp16/bf16 ONNX compute in fp32. The engine is strongly typed, so it runs exactly
these in fp32 too: TensorRT neither lowers nor raises any tensor's type."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx

# Ops that only move or relabel data; the islands are what computes in fp32.
_PLUMBING = {"Cast", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Slice", "Gather", "Expand", "Transpose",
             "Constant", "Identity", "Split"}


def fp32_islands(onnx_path: Path) -> dict[str, dict[str, int]]:
    """{module class (the innermost torch module that emitted the op): {op type: count}} of the compute
    ops whose output is fp32, and of LayerNormalizations whose statistics are fp32. Meant for fp16/bf16
    graphs (in an fp32 graph that is every op)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for g in all_graphs(model.graph) for v in [*g.value_info, *g.output]}
    islands: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in (n for g in all_graphs(model.graph) for n in g.node):
        if node.op_type not in _PLUMBING and node.output and types.get(node.output[0]) == onnx.TensorProto.FLOAT:
            islands[_module(node)][node.op_type] += 1
        elif node.op_type == "LayerNormalization" and _stash_fp32(node):
            islands[_module(node)]["LayerNormalization (fp32 statistics)"] += 1
    return {module: dict(ops.most_common()) for module, ops in sorted(islands.items())}


def _stash_fp32(node) -> bool:
    """LayerNormalization's stash_type (default 1 = float32): the type its mean and variance are computed in."""
    return next((a.i for a in node.attribute if a.name == "stash_type"), 1) == onnx.TensorProto.FLOAT


def all_graphs(graph: onnx.GraphProto):
    """The graph and its subgraphs (the `auto` lowering's If branches), recursively."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)


def _module(node) -> str:
    """'Qwen2MoeRMSNorm' from the exporter's class hierarchy metadata ('?' where it has none)."""
    props = {p.key: p.value for p in node.metadata_props}
    classes = [c.strip(" '\"") for c in props.get("pkg.torch.onnx.class_hierarchy", "").strip("[]").split(",")]
    modules = [c.rsplit(".", 1)[-1] for c in classes if "." in c and not c.startswith("aten.")]
    return modules[-1] if modules else "?"
