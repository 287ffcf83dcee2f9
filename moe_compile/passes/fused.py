"""`fused`: each MoE layer's router top-k and experts op become one `moe_compile::fused_moe` node,
which the ONNX export writes as ONNX Runtime's `com.microsoft:MoE` (export/fused_moe_onnx.py).

    logits ─softmax─▶ TopK ─┬─ values [─÷ Σ values] [─cast]─▶ experts(x, ids, w, gate_up, down)
                            └─ indices ─────────────────────▶
      ═▶  fused_moe(x, logits, gate_up, down, k, renormalize, activation)        (routing inside)

com.microsoft:MoE takes the router *logits* and routes itself: softmax over all experts, top-k,
optionally renormalised over the k. The pass walks back from the experts op's `top_k_index` and
`top_k_weights` to the logits and hands them to the op where the routing equals this:
softmax → top-k (weights = the probabilities), softmax → top-k → ÷ sum (renormalise), and
top-k → softmax over the k (the same thing as the renormalised form).

Any other routing (sigmoid scores, a bias, group limits, a scaling factor, sparsemixer) stays in
the graph as the model computes it, and the op gets logits made from its result:

    ids, w ──▶ scatter(full([T, E], lowest), ids, log w) ──▶ fused_moe(.., renormalize) ──▶ × Σ_k w

softmax over E of those logits is w / Σ w at the chosen experts and exactly 0 elsewhere, so the op's
top-k picks the model's experts and its renormalised weights times Σ w are the model's weights: one
static form for every routing (no If, each expert's weights read once). Only an activation the op
has no form for falls back, to `auto` for that layer; the reason is logged and returned per layer
for the manifest. The router matmul stays outside, as do shared experts and their gate.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import warnings

import torch
from torch.export import ExportedProgram

from ..plugins.fused_op import moe_attributes
from .auto import AutoLowering
from .base import PASSES, Pass, PassResult, op_nodes

log = logging.getLogger("moe_compile.passes")
aten = torch.ops.aten

CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
DIVIDE = {aten.div.Tensor, aten.div_.Tensor}


class Mismatch(Exception):
    """The layer's routing or activation is not what com.microsoft:MoE computes; str() says why."""


def call(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def strip_casts(node: torch.fx.Node) -> torch.fx.Node:
    while call(node, CASTS):
        node = node.args[0]
    return node


def is_last_dim(node: torch.fx.Node, dim: int) -> bool:
    rank = node.meta["val"].dim()
    return dim in (-1, rank - 1)


def describe(node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})" if isinstance(node, torch.fx.Node) else repr(node)


def experts_arguments(node: torch.fx.Node) -> dict:
    """The experts op's arguments by name, defaults filled in (the op may have gained optional ones)."""
    schema = node.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        else:
            values[arg.name] = node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
    return values


def match_router(ids: torch.fx.Node, weights: torch.fx.Node) -> tuple[torch.fx.Node, int, bool]:
    """(router logits, k, renormalize) of a routing com.microsoft:MoE computes, else Mismatch."""
    if not (call(ids, {operator.getitem}) and ids.args[1] == 1 and call(ids.args[0], {aten.topk.default})):
        raise Mismatch(f"top_k_index comes from {describe(ids)}, not from a TopK")
    topk = ids.args[0]
    source, k = topk.args[0], int(topk.args[1])
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    if not largest or not is_last_dim(source, dim):
        raise Mismatch(f"{describe(topk)} is not a top-k of the largest over the experts axis")

    def is_values(node) -> bool:  # the top-k values, possibly cast
        node = strip_casts(node)
        return call(node, {operator.getitem}) and node.args[0] is topk and node.args[1] == 0

    w = strip_casts(weights)
    probs = strip_casts(source)
    if call(probs, SOFTMAX) and is_last_dim(probs, probs.args[1]):
        logits = strip_casts(probs.args[0])
        if is_values(w):
            return logits, k, False
        if call(w, DIVIDE) and is_values(w.args[0]) and call(w.args[1], {aten.sum.dim_IntList}):
            total = w.args[1]
            keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
            if is_values(total.args[0]) and len(total.args[1]) == 1 and is_last_dim(total.args[0], total.args[1][0]) and keepdim:
                return logits, k, True
        raise Mismatch(f"the routing weights are {describe(w)} after softmax -> top-k, not the top-k probabilities "
                       "(optionally divided by their sum)")
    # top-k of the logits, then softmax over the k: softmax -> top-k -> renormalise.
    if call(w, SOFTMAX) and is_values(w.args[0]) and is_last_dim(w, w.args[1]):
        return strip_casts(source), k, True
    raise Mismatch(f"the top-k ranks {describe(probs)}{scored_by(probs)}, not the softmax of the logits or the "
                   "logits themselves followed by a softmax of the k (com.microsoft:MoE routes by softmax only)")


def scored_by(node: torch.fx.Node, depth: int = 6) -> str:
    """', scored by <op>' for the nearest sigmoid/softmax above `node`, to name the routing in the reason."""
    frontier = [node]
    for _ in range(depth):
        for n in frontier:
            name = getattr(n.target, "__name__", "")
            if n.op == "call_function" and name.split(".")[0] in ("sigmoid", "softmax", "_softmax"):
                return f", scored by {describe(n)}"
        frontier = [a for n in frontier for a in n.all_input_nodes]
    return ""


def remove_dead_router(graph: torch.fx.Graph) -> None:
    """Drop what fed only the replaced experts ops: the router's top-k and its casts. Training-IR
    casts carry `_assert_tensor_metadata` checks, which DCE keeps (side effects): drop a check
    whose subject has no other use, then the dead nodes, until nothing changes."""
    assert_op = aten._assert_tensor_metadata.default
    while True:
        checks = [n for n in graph.nodes if call(n, {assert_op})
                  and all(call(u, {assert_op}) for u in n.args[0].users)]
        for node in checks:
            graph.erase_node(node)
        if not graph.eliminate_dead_code() and not checks:
            return


def output_renamed(signature, renamed: dict[str, str]):
    """The signature with user outputs that named a replaced node naming its replacement."""
    specs = [dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=renamed[spec.arg.name]))
             if getattr(spec.arg, "name", None) in renamed else spec for spec in signature.output_specs]
    return dataclasses.replace(signature, output_specs=specs)


def layer_name(node: torch.fx.Node) -> str:
    """The experts module the node was traced in (its qualified path from the captured root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


# The logit of the experts a token did not choose: finite in every float type (fp16's lowest), so that
# softmax gives them exactly 0 without an inf in the graph.
UNCHOSEN = -65504.0


def routed_in_graph(fallback):
    """The experts op, for layers whose routing the op cannot compute, as the op fed with logits made
    from the graph's own top-k ids and weights (module docstring); `fallback` for an activation the
    op has no form for."""

    def experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str, gate_up_bias=None,
                down_bias=None, alpha: float = 1.0, limit: float | None = None):
        if moe_attributes(activation, alpha, limit) is None:
            return fallback(hidden, top_k_index, top_k_weights, gate_up, down, activation, gate_up_bias, down_bias,
                            alpha, limit)
        weights = top_k_weights.float()
        logits = torch.full((hidden.shape[0], gate_up.shape[0]), UNCHOSEN, dtype=torch.float32, device=hidden.device)
        logits = logits.scatter(1, top_k_index.long(), weights.log().clamp_min(UNCHOSEN))
        out = torch.ops.moe_compile.fused_moe(hidden, logits, gate_up, down, top_k_index.shape[-1], True, activation,
                                              gate_up_bias, down_bias, float(alpha), limit)
        return out * weights.sum(-1, keepdim=True).to(out.dtype)

    return experts


class FusedLowering(Pass):
    name = "fused"
    description = "MoE experts + router -> one fused MoE op (com.microsoft:MoE), other routings kept in the graph"

    def _apply(self, program: ExportedProgram) -> PassResult:
        op = torch.ops.moe_compile.experts.default
        if not op_nodes(program, op):
            return PassResult(program, 0, skipped="no MoE experts in the graph")
        # Rewrite a copy: the input program stays as it was (its weights are shared, not copied).
        with warnings.catch_warnings():  # torch's own pytree deprecation notice on copying the spec
            warnings.simplefilter("ignore", FutureWarning)
            module = copy.deepcopy(program.graph_module)
        graph = module.graph
        layers, reasons, renamed = {}, {}, {}
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target == op]:
            layer = layer_name(node)
            args = experts_arguments(node)
            if moe_attributes(args["activation"], args.get("alpha", 1.0), args.get("limit")) is None:
                layers[layer] = self.options.get("fallback", AutoLowering.name)
                reasons[layer] = (f"experts activation '{args['activation']}' has no com.microsoft:MoE form (its swiglu "
                                  "covers SiLU(gate)*up and GPT-OSS's clamped SwiGLU)")
                log.warning("[passes] fused: %s falls back to %s: %s", layer, layers[layer], reasons[layer])
                continue
            try:
                logits, k, renormalize = match_router(args["top_k_index"], args["top_k_weights"])
                experts_k = args["top_k_index"].meta["val"].shape[-1]
                if k != experts_k:
                    raise Mismatch(f"top-k of {k} does not match the experts' {experts_k}")
            except Mismatch as reason:
                layers[layer] = "fused"  # by routed_in_graph, below
                log.info("[passes] fused: %s keeps its routing in the graph (%s)", layer, reason)
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(
                    torch.ops.moe_compile.fused_moe.default,
                    (args["hidden_states"], logits, args["gate_up_proj"], args["down_proj"], k, renormalize,
                     args["activation"], args.get("gate_up_bias"), args.get("down_bias"), float(args.get("alpha", 1.0)),
                     args.get("limit")),
                )
            fused.meta = dict(node.meta)
            renamed[node.name] = fused.name
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            layers[layer] = "fused"
        remove_dead_router(graph)
        module.recompile()
        result = program._update(module, output_renamed(program.graph_signature, renamed))
        if any(n.target == op for n in graph.nodes):  # routing kept in the graph; activations that fall back (`auto`: If)
            fallback = PASSES[self.options.get("fallback", AutoLowering.name)](**self.options)
            result = result.run_decompositions({op: routed_in_graph(fallback.lowering())})
        fused_count = sum(1 for v in layers.values() if v == "fused")
        return PassResult(result, fused_count, layers=layers, reasons=reasons)
