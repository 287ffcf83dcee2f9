"""Our fused MoE kernels inside ONNX Runtime's CUDA graph: the `moe_compile:FusedMoE` custom op.

A build's `com.microsoft:MoE` nodes (the `fused` lowering and the ort form) run on every provider.
On the CUDA provider, ONNX Runtime's MoE spends 47 µs a layer at batch 1 on Qwen1.5-MoE-A2.7B's
shape, 16 of them routing and permutation kernels, where the experts' 69 MB take 17 µs at the
floor (docs/BENCHMARKS.md). Our kernels (plugins/csrc) route, stream each chosen expert once and sum
in three launches. When the custom-op library (plugins/ort_csrc, built with onnxruntime's C header)
is at hand, `ort-cuda` loads the build's graph with each MoE node that our kernels compute swapped
for `moe_compile:FusedMoE`; the weights stay the same initializers, read from the same external
data file: the swap touches the graph, never the files of the build.

A shared expert beside the MoE node (Qwen2-MoE: gate/up MatMul, Split, SiLU, Mul, down Gemm, times the
sigmoid of its gate, added to the MoE output) moves into the same op: at batch 1 its columns stream
while the routing warp works, and its rows join the down kernel's sums (H200, 2026-12-01, A2.7B shape, fp16,
CUDA-graph replays: 46 µs a layer for routed + shared experts against 71 µs with the shared expert
as cuBLAS GEMMs and five small kernels; bench/bench_fused_moe.py --shared). Up to 16 tokens (batch 8
decode) the same holds on the tensor-core GEMV: 162 µs against 205 with the shared expert on cuBLAS.
Nine nodes a layer go.

A quantized build's `com.microsoft:QMoE` nodes (`--quantize int4|int8`, weights_prepacked=0) become
`moe_compile:FusedQMoE` on the same codes and scales: at decode sizes our tensor-core kernels read the
codes and dequantize in registers. Its shared expert, two MatMulNBits at the QMoE's bits and block, moves
into the same op as the float one does (the same nine nodes go). H200, A2.7B int4, batch 1 (docs/BENCHMARKS.md):
542.3 tok/s on this op against 407.7 for fp16 (2026-12-02); 476.8 on an earlier version of it against 392.4 on
ONNX Runtime's QMoE (2026-12-01).

The quantized build's other MatMulNBits nodes (attention projections; the LM head with --quantize-lm-head) become
`moe_compile:MatMulNBits` on the same codes, scales and bias, where the activations are 16-bit: the MoE kernels'
tensor-core GEMV for one dense matrix (plugins/csrc/quant_matmul.cu), the bias added in the same launch; past 16
rows ONNX Runtime's Gemm on the weight dequantized. H200, A2.7B (docs/BENCHMARKS.md, eighth run): the projections
take 10.5 us a layer, as ONNX Runtime's 9.9 + 1.4 for the bias Add; the int4 LM head ~70 us a step less than
the fp16 one on cuBLAS (ONNX Runtime's `MatMulNBits` took longer than cuBLAS for it), with 1.0 GB less device memory.
The kernel starts as its predecessor's programmatic dependent, its first weights in flight before it waits for x:
int4 + LM head 701-719 tok/s against 686-688 without (twelfth run).

The ort form's com.microsoft:GroupQueryAttention nodes (shared KV buffer, half-split rotary) become
`moe_compile:GroupQueryAttention` on the same inputs: a decode step (one new token a row) rotates, appends and attends
in one launch of ours (plugins/csrc/decode_attention.cu; two before 2026-12-03), where ONNX Runtime's takes five;
prefill runs ONNX Runtime's own kernel, invoked by the op. H200, A2.7B, 24 layers (docs/BENCHMARKS.md, eleventh run, A B B A in one
lease): fp16 440.9 / 459.6 tok/s against 432.9 / 429.3 with ONNX Runtime's, int4 with the LM head 666.0 / 692.2
against 609.4 / 621.6, prefill unchanged; 7.3 us a layer at 128 tokens in the kernel benchmark against 12.7 for
ONNX Runtime's five in a step's profile.

The com.microsoft:SkipSimplifiedLayerNormalization nodes (two a layer) become
`moe_compile:SkipSimplifiedLayerNormalization` on the same inputs and outputs, beside our other ops only (the launch
chain it keeps is theirs): one launch of ours (plugins/csrc/norm.cu), rounded as ONNX Runtime's, that lets the next
launch start at once, so that the quantized q/k/v matmul after it has its weights in flight while the norm runs;
ONNX Runtime's norm kept it waiting.

The sampler at the graph's end, ONNX TopK over the logits (64 candidates) and the ArgMax beside it, becomes
`moe_compile:TopK` beside our other ops: two launches of ours (plugins/csrc/top_k.cu) over A2.7B's 151936 logits, 18 us
a step where ONNX Runtime's TopK and ArgMax take five launches and 34 us (H200, docs/BENCHMARKS.md, seventeenth run:
int4 + LM head 734.1 / 715.9 tok/s against 696.0 / 682.9, A B B A). Same candidates in the same order (ties to the
lower id), and the argmax is the first of them.

The router's MatMul (fp16/bf16 weight [H, E (+1)] feeding our MoE op's logits) folds into the op: input 1 becomes
the router's rows (a Transpose of the initializer, folded when the session starts) and one launch of ours
(plugins/csrc/router.cu) computes the fp32 logits where cuBLAS's GEMV and a cast ran; the quantized gate/up launch
at T = 1 starts as its programmatic dependent. H200, A2.7B (docs/BENCHMARKS.md, fifteenth run): the router 5.0 ->
3.3 us at T = 1; with the norms above, int4 + LM head +8.5% a step (740.9 / 742.9 tok/s against 699.4 / 665.9, A B B
A), fp16 unchanged within the noise.

    MOE_COMPILE_MOE_KERNELS=ort     keep ONNX Runtime's MoE (comparisons, debugging)
    MOE_COMPILE_MATMUL_KERNELS=ort  keep ONNX Runtime's MatMulNBits
    MOE_COMPILE_ATTENTION_KERNELS=ort  keep ONNX Runtime's GroupQueryAttention
    MOE_COMPILE_ROUTER_KERNELS=ort  keep the router's MatMul on ONNX Runtime (cuBLAS) beside our MoE op
    MOE_COMPILE_NORM_KERNELS=ort    keep ONNX Runtime's SkipSimplifiedLayerNormalization
    MOE_COMPILE_TOPK_KERNELS=ort    keep ONNX Runtime's TopK and ArgMax over the logits
    MOE_COMPILE_ORT_OPS_LIB=PATH    a prebuilt libmoe_compile_ort.so
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..plugins.build import ORT_LIBRARY_NAME, BuildError, build_ort_op, default_build_dir, find_nvcc, ort_include_dir

DOMAIN = "moe_compile"
OP = "FusedMoE"
QUANTIZED_OP = "FusedQMoE"
MATMUL_OP = "MatMulNBits"  # com.microsoft:MatMulNBits' contract (no zero points or group index) in our domain
ATTENTION_OP = "GroupQueryAttention"  # com.microsoft:GroupQueryAttention's first nine inputs, in our domain
NORM_OP = "SkipSimplifiedLayerNormalization"  # com.microsoft's, outputs 0 and 3 only, in our domain
NORM_WIDEST = 32768  # elements a row, 16-bit (plugins/csrc/norm.cu)
TOP_K_OP = "TopK"  # ONNX TopK (largest, sorted, last axis) with the ArgMax over the same input as output 2
TOP_K_WIDEST = 64  # candidates a row (plugins/csrc/top_k.cu)
NO_MOE_NODES = "no com.microsoft:MoE, QMoE or MatMulNBits nodes"
OURS_OPS = ("MoE", "QMoE", "MatMulNBits")
ATTENTION_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"}
ATTENTION_HEAD_SIZES = (16, 32, 64, 128, 256)
ATTENTION_GROUPS = (1, 2, 4, 8, 16)  # query heads a KV head


@dataclass(frozen=True)
class Swap:
    """The graph to give ONNX Runtime, and which MoE kernels it runs (`reason` says why not ours)."""

    model: onnx.ModelProto | None  # None: load the build's model.onnx unchanged
    library: Path | None
    swapped: int  # MoE and QMoE nodes
    reason: str
    matmuls: int = 0  # MatMulNBits nodes
    attentions: int = 0  # GroupQueryAttention nodes
    routers: int = 0  # router MatMuls folded into our MoE ops
    norms: int = 0  # SkipSimplifiedLayerNormalization nodes
    top_ks: int = 0  # TopK nodes (each with its ArgMax where there is one)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _activation_reason(attrs: dict) -> str | None:
    activation = attrs.get("activation_type", b"relu")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if activation != "swiglu" or attrs.get("swiglu_fusion", 0) != 1:
        return f"activation {activation} (fusion {attrs.get('swiglu_fusion', 0)}); ours is SwiGLU, interleaved"
    if attrs.get("activation_alpha", 1.0) != 1.0 or attrs.get("activation_beta", 0.0) != 0.0 or "swiglu_limit" in attrs:
        return "a scaled or clamped SwiGLU (gpt-oss)"
    if attrs.get("use_sparse_mixer", 0):
        return "sparse-mixer routing"
    return None


def why_not_ours(node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this com.microsoft:MoE node exactly, else the reason."""
    reason = _activation_reason(_attributes(node))
    if reason:
        return reason
    if any(name for name in list(node.input)[5:]) or (len(node.input) > 3 and node.input[3]):
        return "expert biases"
    return None


# com.microsoft:QMoE's inputs: x, router_probs, fc1 codes, fc1 scales, fc1 bias, fc2 codes, fc2 scales, fc2 bias,
# fc3 codes/scales/bias, fc1/fc2/fc3 zero points, router_weights
_QMOE_EXTRAS = {4: "expert biases", 7: "expert biases", 8: "a third expert matrix (fc3)", 9: "a third expert matrix (fc3)",
                10: "a third expert matrix (fc3)", 11: "zero points", 12: "zero points", 13: "zero points"}


def why_not_ours_quantized(g: "_Graph", node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this com.microsoft:QMoE node exactly, else the reason."""
    attrs = _attributes(node)
    reason = _activation_reason(attrs)
    if reason:
        return reason
    inputs = list(node.input)
    for index, why in _QMOE_EXTRAS.items():
        if index < len(inputs) and inputs[index]:
            return why
    if len(inputs) > 14 and inputs[14] and _router_softmax(g, node) is None:
        return "router weights other than the softmax of its logits"
    bits, block = attrs.get("expert_weight_bits", 4), attrs.get("block_size", 0)
    if bits not in (4, 8) or attrs.get("weights_prepacked", -1) != 0:
        return f"{bits}-bit weights prepacked ({attrs.get('weights_prepacked', -1)}); ours read 4/8-bit raw codes"
    if block not in (32, 64, 128):
        return f"block size {block}; ours take blocks of 32, 64 or 128 (no per-channel scales)"
    fc1, fc2 = g.dims(inputs[2]), g.dims(inputs[5])
    if fc1 is None or fc2 is None or (fc1[2] * 8 // bits) % block or (fc2[2] * 8 // bits) % block:
        return "expert codes that are no initializers of whole blocks"
    return None


def _router_softmax(g: "_Graph", node: onnx.NodeProto) -> onnx.NodeProto | None:
    """QMoE's router_weights input when it is Softmax(router logits, last axis) (quantize/onnx_rewrite.py
    adds it where routing weights are not renormalised), which our kernels compute from the logits."""
    softmax = g.made_by(node.input[14], "Softmax")
    if softmax is None or softmax.input[0] != node.input[1] or _attributes(softmax).get("axis", -1) != -1:
        return None
    return softmax


class _Graph:
    """Producer and consumers of each value name, and the initializers, of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and users[0].domain in ("", "ai.onnx") \
                and name not in self.outputs:
            return users[0]
        return None

    def made_by(self, name: str, op_type: str, domain: str = "") -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain == domain else None

    def dims(self, name: str) -> list[int] | None:
        init = self.initializers.get(name)
        return list(init.dims) if init is not None else None

    def values(self, name: str):
        init = self.initializers.get(name)
        return None if init is None else onnx.numpy_helper.to_array(init)


def _matmul_nbits(g: _Graph, name: str, quant: tuple[int, int]) -> tuple[onnx.NodeProto, int, int] | None:
    """(node, N, K) of the com.microsoft:MatMulNBits making `name` from codes and scales alone (no zero points,
    group index or bias) at the QMoE node's (bits, block)."""
    node = g.made_by(name, "MatMulNBits", "com.microsoft")
    if node is None or len(node.input) < 3 or any(node.input[3:]):
        return None
    attrs = _attributes(node)
    if (attrs.get("bits"), attrs.get("block_size")) != quant or g.dims(node.input[1]) is None \
            or g.dims(node.input[2]) is None or attrs.get("K", 0) % quant[1]:
        return None
    return node, attrs["N"], attrs["K"]


def _shared_expert(g: _Graph, moe: onnx.NodeProto, quant: tuple[int, int] | None = None
                   ) -> tuple[list[onnx.NodeProto], dict] | None:
    """The Qwen2-MoE shared expert around this MoE node, as the ort form writes it:

        L = MatMul(x, [router | shared gate]); logits, z = Split(L, [E, 1])
        gu = MatMul(x, W_gate_up [H, 2I_s]); g, u = Split(gu, [I_s, I_s]); a = QuickGelu(g, alpha 1) * u
        d = Gemm(a, W_down [H, I_s], transB=1);  out = MoE(x, logits, ...) + Sigmoid(z) * d

    or, beside a QMoE node (`quant`: its bits and block), both projections as MatMulNBits at the same bits and
    block (the router's Softmax that quantize/onnx_rewrite.py feeds QMoE may read the logits too)
    -> (the nodes the fused op replaces, what it needs), or None where the graph differs in any way."""
    x, logits = moe.input[0], moe.input[1]
    split_router = g.made_by(logits, "Split")
    add = g.only_consumer(moe.output[0], "Add")
    if split_router is None or add is None or len(split_router.output) != 2 or split_router.output[0] != logits:
        return None
    softmax = _router_softmax(g, moe) if quant and len(moe.input) > 14 and moe.input[14] else None
    readers = {c.output[0] for c in g.consumers.get(logits, [])} - {moe.output[0]}
    if softmax is not None and len(g.consumers.get(softmax.output[0], [])) != 1:
        return None  # the Softmax stays, and would read the Split that goes
    if readers - ({softmax.output[0]} if softmax is not None else set()):
        return None
    sizes = g.values(split_router.input[1]) if len(split_router.input) > 1 else None
    num_experts = g.dims(moe.input[2])[0] if g.dims(moe.input[2]) else None
    if sizes is None or list(sizes) != [num_experts, 1]:
        return None
    sigmoid = g.only_consumer(split_router.output[1], "Sigmoid")
    scaled = g.made_by(add.input[1] if add.input[0] == moe.output[0] else add.input[0], "Mul")
    if sigmoid is None or scaled is None or sigmoid.output[0] not in scaled.input:
        return None
    down_out = scaled.input[1] if scaled.input[0] == sigmoid.output[0] else scaled.input[0]
    if quant:
        found = _matmul_nbits(g, down_out, quant)
        hidden = g.dims(moe.input[5])[1] if g.dims(moe.input[5]) else None
        if found is None or found[1] != hidden:
            return None
        down, shared_i = found[0], found[2]
    else:
        down = g.made_by(down_out, "Gemm")
        if down is None or len(down.input) != 2 or g.dims(down.input[1]) is None:
            return None
        gemm = _attributes(down)
        if gemm.get("transB", 0) != 1 or gemm.get("transA", 0) or gemm.get("alpha", 1.0) != 1.0:
            return None
        shared_i = g.dims(down.input[1])[1]
    act = g.made_by(down.input[0], "Mul")
    if act is None or len(g.consumers.get(act.output[0], [])) != 1:
        return None
    quick_gelu = next((g.made_by(i, "QuickGelu", "com.microsoft") for i in act.input
                       if g.made_by(i, "QuickGelu", "com.microsoft") is not None), None)
    if quick_gelu is None or _attributes(quick_gelu).get("alpha", 1.702) != 1.0:
        return None
    up = act.input[1] if act.input[0] == quick_gelu.output[0] else act.input[0]
    split_shared = g.made_by(quick_gelu.input[0], "Split")
    if split_shared is None or list(split_shared.output) != [quick_gelu.input[0], up]:
        return None
    split_sizes = g.values(split_shared.input[1]) if len(split_shared.input) > 1 else None
    if split_sizes is None or list(split_sizes) != [shared_i, shared_i]:
        return None
    if quant:
        found = _matmul_nbits(g, split_shared.input[0], quant)
        if found is None or found[1] != 2 * shared_i or found[2] != hidden:
            return None
        gate_up = found[0]
    else:
        gate_up = g.made_by(split_shared.input[0], "MatMul")
        if gate_up is None or g.dims(gate_up.input[1]) is None or g.dims(gate_up.input[1])[1] != 2 * shared_i:
            return None
    if gate_up.input[0] != x:
        return None
    inner = [split_shared.output[0], split_shared.output[1], quick_gelu.output[0], act.output[0], down.output[0],
             sigmoid.output[0], gate_up.output[0], split_router.output[1], scaled.output[0]]
    if any(len(g.consumers.get(name, [])) != 1 or name in g.outputs for name in inner):
        return None
    replaced = [split_router, sigmoid, gate_up, split_shared, quick_gelu, act, down, scaled, add]
    parts = {"logits": split_router.input[0], "gate_up": gate_up.input[1], "down": down.input[1], "output": add.output[0]}
    if quant:
        parts.update(gate_up_scales=gate_up.input[2], down_scales=down.input[2])
    return replaced, parts


def _rewrite_nodes(model: onnx.ModelProto, swapped: int, removed: set[str], first: list = ()) -> None:
    """After a swap: drop the nodes whose first output is in `removed` (our ops keep theirs: a fused op takes over
    the output name of the last node it replaces), put `first` in front, and declare our domain if a node uses it."""
    if removed or first:
        kept = [n for n in model.graph.node if n.domain == DOMAIN or n.output[0] not in removed]
        del model.graph.node[:]
        model.graph.node.extend(list(first) + kept)
    if swapped and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))


def _ours(model: onnx.ModelProto, op_type: str, why, kept: set[str]):
    """The com.microsoft:`op_type` nodes of `model` that our kernels compute (`why(node)` is None), in graph order;
    the reasons of the others go into `kept`."""
    for node in model.graph.node:
        if node.op_type == op_type and node.domain == "com.microsoft":
            reason = why(node)
            if reason:
                kept.add(reason)
            else:
                yield node


def swap_moe_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every MoE node our kernels compute by moe_compile:FusedMoE, with the shared
    expert around it where there is one (_shared_expert), and every QMoE node by moe_compile:FusedQMoE
    (the router Softmax it was given goes with it). Returns (nodes swapped, the reasons of the ones
    kept, '' if none)."""
    swapped, kept = 0, set()
    g = _Graph(model.graph)
    removed: set[str] = set()  # by first output: protobuf hands out new wrappers on each access
    transposes = []
    for node in model.graph.node:
        if node.op_type == "QMoE" and node.domain == "com.microsoft":
            reason = why_not_ours_quantized(g, node)
            if reason:
                kept.add(reason)
                continue
            if len(node.input) > 14 and node.input[14]:
                softmax = _router_softmax(g, node)
                if len(g.consumers.get(softmax.output[0], [])) == 1:
                    removed.add(softmax.output[0])
            attrs = _attributes(node)
            bits = attrs.get("expert_weight_bits", 4)
            inputs, outputs, extra = [node.input[i] for i in (0, 1, 2, 3, 5, 6)], list(node.output), {}
            shared = _shared_expert(g, node, quant=(bits, attrs["block_size"]))
            if shared is not None:  # MatMulNBits' codes and scales as they are: rows [N, K/block, blob]
                replaced, parts = shared
                removed.update(n.output[0] for n in replaced)
                inputs[1] = parts["logits"]
                inputs += [parts["gate_up"], parts["gate_up_scales"], parts["down"], parts["down_scales"]]
                outputs, extra = [parts["output"]], {"shared_gate": 1}
            node.CopyFrom(onnx.helper.make_node(
                QUANTIZED_OP, inputs, outputs, name=node.name, domain=DOMAIN, k=attrs["k"],
                normalize_routing_weights=attrs.get("normalize_routing_weights", 0), expert_weight_bits=bits,
                block_size=attrs["block_size"], **extra))
            swapped += 1
            continue
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        reason = why_not_ours(node)
        if reason:
            kept.add(reason)
            continue
        attrs = _attributes(node)
        inputs = [node.input[0], node.input[1], node.input[2], node.input[4]]
        outputs, shared_gate = list(node.output), 0
        shared = _shared_expert(g, node)
        if shared is not None:
            replaced, parts = shared
            removed.update(n.output[0] for n in replaced)
            # [H, 2I_s] as MatMul holds it -> [2I_s, H], rows as the kernels stream them: ONNX Runtime
            # folds the Transpose of the initializer once, at session creation
            transposed = f"{parts['gate_up']}.rows"
            transposes.append(onnx.helper.make_node("Transpose", [parts["gate_up"]], [transposed], perm=[1, 0],
                                                    name=f"{node.name}_shared_rows"))
            inputs = [node.input[0], parts["logits"], node.input[2], node.input[4], transposed, parts["down"]]
            outputs, shared_gate = [parts["output"]], 1
        replacement = onnx.helper.make_node(OP, inputs, outputs, name=node.name, domain=DOMAIN, k=attrs["k"],
                                            normalize_routing_weights=attrs.get("normalize_routing_weights", 0),
                                            **({"shared_gate": shared_gate} if shared is not None else {}))
        node.CopyFrom(replacement)
        swapped += 1
    _rewrite_nodes(model, swapped, removed, first=transposes)  # the Transposes read initializers only
    return swapped, "; ".join(sorted(kept))


def fold_router_matmuls(model: onnx.ModelProto) -> int:
    """Give each swapped MoE op its router MatMul, in place: where a FusedMoE/FusedQMoE node's logits come from
    MatMul(its own x, W [H, E (+1)]) that nothing else reads, the node takes W's rows (a Transpose of the initializer,
    folded when the session starts) with router_rows=1 and computes the logits in one launch of ours
    (plugins/csrc/router.cu), where ONNX Runtime ran cuBLAS's GEMV and the op a conversion to float32. Returns the
    MatMuls folded."""
    g = _Graph(model.graph)
    removed, transposes = set(), []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in (OP, QUANTIZED_OP):
            continue
        router = g.made_by(node.input[1], "MatMul")
        attrs = _attributes(node)
        experts = g.dims(node.input[2])
        weight = g.dims(router.input[1]) if router is not None else None
        if router is None or router.input[0] != node.input[0] or weight is None or experts is None \
                or weight[1] != experts[0] + attrs.get("shared_gate", 0) or len(g.consumers[node.input[1]]) != 1 \
                or node.input[1] in g.outputs:
            continue
        rows = f"{router.input[1]}.rows"
        transposes.append(onnx.helper.make_node("Transpose", [router.input[1]], [rows], perm=[1, 0],
                                                name=f"{node.name}_router_rows"))
        removed.add(router.output[0])
        node.input[1] = rows
        node.attribute.append(onnx.helper.make_attribute("router_rows", 1))
    _rewrite_nodes(model, len(transposes), removed, first=transposes)
    return len(transposes)


def why_not_ours_matmul(g: _Graph, node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this com.microsoft:MatMulNBits node exactly, else the reason."""
    attrs = _attributes(node)
    if any(list(node.input)[3:5]):
        return "MatMul zero points or group index"
    bits, block, k, n = (attrs.get(name, 0) for name in ("bits", "block_size", "K", "N"))
    if bits not in (4, 8) or block not in (32, 64, 128) or k % block:
        return f"MatMul of {bits}-bit weights in blocks of {block} over K = {k}; ours read 4/8 bits in 32, 64 or 128"
    codes, scales = g.initializers.get(node.input[1]), g.initializers.get(node.input[2])
    if codes is None or scales is None or list(codes.dims) != [n, k // block, block * bits // 8]:
        return "MatMul codes that are no initializer of whole blocks"
    if scales.data_type not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return "a float32 MatMul (ours take 16-bit activations)"
    return None


def _bias_add(g: _Graph, node: onnx.NodeProto, n: int) -> tuple[onnx.NodeProto, str] | None:
    """(the Add, its bias) where the node's output only goes to an Add of a constant [N] vector of the scales' type
    (builds made before 2026-12-03 add q/k/v's packed bias after MatMulNBits; later ones give it as its bias
    input): our op adds it in the same launch."""
    add = g.only_consumer(node.output[0], "Add")
    if add is None:
        return None
    bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    init = g.initializers.get(bias)
    if init is None or list(init.dims) != [n] or init.data_type != g.initializers[node.input[2]].data_type:
        return None
    return add, bias


def swap_matmul_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every com.microsoft:MatMulNBits node our kernels compute by moe_compile:MatMulNBits (A,
    codes, scales[, bias]), with the bias Add after it where there is one (_bias_add). Returns (nodes swapped, the
    reasons of the ones kept, '' if none)."""
    swapped, kept = 0, set()
    g = _Graph(model.graph)
    folded: set[str] = set()  # the bias Adds, by output
    for node in _ours(model, "MatMulNBits", lambda node: why_not_ours_matmul(g, node), kept):
        attrs = _attributes(node)
        bias, outputs = (node.input[5] if len(node.input) > 5 and node.input[5] else None), list(node.output)
        add = _bias_add(g, node, attrs["N"]) if bias is None else None
        if add is not None:
            bias, outputs = add[1], list(add[0].output)
            folded.add(outputs[0])
        node.CopyFrom(onnx.helper.make_node(
            MATMUL_OP, list(node.input[:3]) + ([bias] if bias else []), outputs, name=node.name, domain=DOMAIN,
            **{name: attrs[name] for name in ("K", "N", "bits", "block_size")}))
        swapped += 1
    _rewrite_nodes(model, swapped, folded)
    return swapped, "; ".join(sorted(kept))


def _input_dims(model: onnx.ModelProto, name: str) -> tuple[list, int] | None:
    """(dims, element type) of a graph input: the KV cache's [batch, kv_heads, max_seq, head_size]."""
    for value in model.graph.input:
        if value.name == name:
            shape = value.type.tensor_type.shape
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim], \
                value.type.tensor_type.elem_type
    return None


def why_not_ours_attention(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this com.microsoft:GroupQueryAttention node's decode step exactly, else why."""
    attrs = _attributes(node)
    extra = sorted(set(attrs) - ATTENTION_ATTRIBUTES)
    if extra or attrs.get("rotary_interleaved", 0):
        return f"attention with {', '.join(extra) or 'interleaved rotary'}"
    if len(node.input) > 9 and any(node.input[9:]):
        return "attention with position ids, a bias or sinks"
    cache = _input_dims(model, node.input[3]) if len(node.input) > 4 else None
    if cache is None or len(cache[0]) != 4 or not isinstance(cache[0][3], int) or not isinstance(cache[0][1], int):
        return "attention whose KV cache is no graph input of known head size"
    dims, element = cache
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if element not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return "a float32 attention (ours take 16-bit)"
    if dims[3] not in ATTENTION_HEAD_SIZES or kv_heads != dims[1] or kv_heads <= 0 or heads % kv_heads \
            or heads // kv_heads not in ATTENTION_GROUPS:
        return f"attention of head size {dims[3]}, {heads} heads over {kv_heads}; ours take head sizes " \
            f"{ATTENTION_HEAD_SIZES} and {ATTENTION_GROUPS} query heads a KV head"
    return None


def swap_attention_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every com.microsoft:GroupQueryAttention node our kernels compute by
    moe_compile:GroupQueryAttention (the same inputs and outputs). Returns (nodes swapped, the reasons of the ones
    kept, '' if none)."""
    swapped, kept = 0, set()
    for node in _ours(model, "GroupQueryAttention", lambda node: why_not_ours_attention(model, node), kept):
        attrs = _attributes(node)
        node.CopyFrom(onnx.helper.make_node(
            ATTENTION_OP, list(node.input[:9]), list(node.output[:3]), name=node.name, domain=DOMAIN,
            num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"], scale=float(attrs.get("scale", 0.0)),
            do_rotary=attrs.get("do_rotary", 0)))
        swapped += 1
    _rewrite_nodes(model, swapped, set())
    return swapped, "; ".join(sorted(kept))


def why_not_ours_norm(g: _Graph, node: onnx.NodeProto) -> str | None:
    """None if our kernel computes this com.microsoft:SkipSimplifiedLayerNormalization node exactly, else the reason."""
    if any(name in g.consumers or name in g.outputs for name in list(node.output)[1:3] if name):
        return "a norm whose mean or inv_std_var is read"
    gamma = g.initializers.get(node.input[2])
    if gamma is None or len(gamma.dims) != 1:
        return "a norm whose gamma is no initializer [H]"
    if gamma.data_type not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return "a float32 norm (ours takes 16-bit)"
    hidden = gamma.dims[0]
    if hidden % 8 or hidden > NORM_WIDEST:
        return f"a norm over {hidden} elements; ours takes multiples of 8 up to {NORM_WIDEST}"
    return None


def swap_norm_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every com.microsoft:SkipSimplifiedLayerNormalization node our kernel computes by
    moe_compile:SkipSimplifiedLayerNormalization (the same inputs, outputs and epsilon; outputs 1 and 2, mean and
    inv_std_var, which the ort form names but nothing reads, left empty). Returns (nodes swapped, the reasons of the
    ones kept, '' if none)."""
    swapped, kept = 0, set()
    g = _Graph(model.graph)
    for node in _ours(model, "SkipSimplifiedLayerNormalization", lambda node: why_not_ours_norm(g, node), kept):
        outputs = [name if i not in (1, 2) else "" for i, name in enumerate(node.output)]
        node.CopyFrom(onnx.helper.make_node(NORM_OP, list(node.input), outputs, name=node.name,
                                            domain=DOMAIN, epsilon=float(_attributes(node).get("epsilon", 1e-12))))
        swapped += 1
    _rewrite_nodes(model, swapped, set())
    return swapped, "; ".join(sorted(kept))


def why_not_ours_top_k(g: _Graph, node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this ONNX TopK node exactly, else the reason."""
    attrs = _attributes(node)
    if attrs.get("largest", 1) != 1 or attrs.get("sorted", 1) != 1 or attrs.get("axis", -1) != -1:
        return "a TopK other than the largest, sorted, over the last axis"
    if g.output_types.get(node.input[0]) != onnx.TensorProto.FLOAT:
        return "a TopK over other than the graph's float32 logits"
    k = g.values(node.input[1])
    if k is None or k.size != 1 or not 1 <= int(k.reshape(-1)[0]) <= TOP_K_WIDEST:
        return f"a TopK of no constant K from 1 to {TOP_K_WIDEST}"
    return None


def _argmax_beside(g: _Graph, top_k: onnx.NodeProto) -> onnx.NodeProto | None:
    """The ArgMax over the same input as the TopK, the last axis, its first maximum, no kept axis."""
    for node in g.consumers.get(top_k.input[0], []):
        attrs = _attributes(node)
        if node.op_type == "ArgMax" and node.domain in ("", "ai.onnx") and attrs.get("axis", 0) == -1 \
                and attrs.get("keepdims", 1) == 0 and attrs.get("select_last_index", 0) == 0:
            return node
    return None


def swap_top_k_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every ONNX TopK node our kernels compute by moe_compile:TopK (X -> values, indices), with the
    ArgMax beside it as output 2 where there is one (_argmax_beside). Returns (nodes swapped, the reasons of the ones
    kept, '' if none)."""
    swapped, kept = 0, set()
    g = _Graph(model.graph)
    folded: set[str] = set()  # the ArgMaxes, by output
    for node in model.graph.node:
        if node.op_type != "TopK" or node.domain not in ("", "ai.onnx"):
            continue
        reason = why_not_ours_top_k(g, node)
        if reason:
            kept.add(reason)
            continue
        argmax = _argmax_beside(g, node)
        if argmax is not None and argmax.output[0] in folded:  # another TopK over the same input took it
            argmax = None
        outputs = list(node.output[:2]) + ([argmax.output[0]] if argmax is not None else [])
        if argmax is not None:
            folded.add(argmax.output[0])
        node.CopyFrom(onnx.helper.make_node(TOP_K_OP, [node.input[0]], outputs, name=node.name, domain=DOMAIN,
                                            k=int(g.values(node.input[1]).reshape(-1)[0])))
        swapped += 1
    _rewrite_nodes(model, swapped, folded)
    return swapped, "; ".join(sorted(kept))


def library(build: bool = True) -> tuple[Path | None, str]:
    """The custom-op library, built first (`build`) where nvcc and onnxruntime's header are at hand; else (None, why)."""
    prebuilt = os.environ.get("MOE_COMPILE_ORT_OPS_LIB")
    if prebuilt:
        return (Path(prebuilt), "") if Path(prebuilt).is_file() else (None, f"MOE_COMPILE_ORT_OPS_LIB={prebuilt} is no file")
    built = default_build_dir() / ORT_LIBRARY_NAME
    if not build or find_nvcc() is None or ort_include_dir() is None:
        if built.is_file():
            return built, ""
        return None, f"{ORT_LIBRARY_NAME} is not built: python -m moe_compile.plugins.build --ort-include DIR"
    try:
        return build_ort_op(), ""
    except BuildError as err:
        return None, f"building {ORT_LIBRARY_NAME} failed: {str(err).splitlines()[-1][:200]}"


def prepare(onnx_path: Path) -> Swap:
    """What the CUDA provider should load for this build's model.onnx."""
    moe, matmul, attention, norm, top_k = (os.environ.get(f"MOE_COMPILE_{which}_KERNELS", "") != "ort"
                                           for which in ("MOE", "MATMUL", "ATTENTION", "NORM", "TOPK"))
    if not moe and not matmul and not attention:
        return Swap(None, None, 0, "MOE_COMPILE_{MOE,MATMUL,ATTENTION}_KERNELS=ort")
    model = onnx.load(str(onnx_path), load_external_data=False)  # the graph only: the weights stay in their file
    ours = OURS_OPS + ((ATTENTION_OP,) if attention else ())
    if not any(n.op_type in ours and n.domain == "com.microsoft" for n in model.graph.node):
        return Swap(None, None, 0, NO_MOE_NODES)
    path, why = library()
    if path is None:
        return Swap(None, None, 0, why)
    swapped, kept = swap_moe_nodes(model) if moe else (0, "MOE_COMPILE_MOE_KERNELS=ort")
    routers = fold_router_matmuls(model) if swapped and os.environ.get("MOE_COMPILE_ROUTER_KERNELS", "") != "ort" else 0
    matmuls, kept_matmuls = swap_matmul_nodes(model) if matmul else (0, "")
    attentions, kept_attentions = swap_attention_nodes(model) if attention else (0, "")
    norms, kept_norms = swap_norm_nodes(model) if norm else (0, "")
    top_ks, kept_top_ks = swap_top_k_nodes(model) if top_k else (0, "")
    reason = "; ".join(r for r in (kept, kept_matmuls, kept_attentions, kept_norms, kept_top_ks) if r)
    if not swapped and not matmuls and not attentions:  # norms and the sampler alone: the build as it is
        return Swap(None, None, 0, reason)
    return Swap(model, path, swapped, reason, matmuls, attentions, routers, norms, top_ks)
