"""How many copies of a MoE layer's expert weights a TensorRT engine holds, for the ONNX forms the
lowerings can take: one hand-written fp16 layer (SiLU-gated experts, top-k ids as an input), built
ahead of time with whichever TensorRT is installed (tensorrt_rtx on the CPU machines), and the bytes
of ONNX Runtime's optimised initializers for the same graph.

    python bench/trt_weight_copies.py [--experts 16] [--hidden 512] [--inter 1024]

Forms (`auto`'s If chooses the gather branch for T <= 8 tokens):
    gather          Gather(W, ids) -> batched MatMul                          (the gather lowering)
    dense-xWt       MatMul(x, Transpose(W))                                   (dense before 2026-11-23)
    auto-xWt        If(gather, dense-xWt)                                     (auto before 2026-11-23)
    auto-Wxt        If(gather, MatMul(W, Transpose(x)))                       (auto now)
    auto-both-Wt    If(Gather(Transpose(W)), MatMul(x, Transpose(W)))         (one transposed copy for both)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moe_compile.trt import compat
from moe_compile.trt.precision import all_graphs

K, THRESHOLD = 2, 8
FORMS = ("gather", "dense-xWt", "auto-xWt", "auto-Wxt", "auto-both-Wt")


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def silu_glu(p: str, h: str, axis: int) -> list:
    """a = silu(gate) * up from the gate/up halves of `h` along `axis`."""
    return [node("Split", [h], [p + "g", p + "u"], axis=axis, num_outputs=2), node("Sigmoid", [p + "g"], [p + "s"]),
            node("Mul", [p + "g", p + "s"], [p + "silu"]), node("Mul", [p + "silu", p + "u"], [p + "a"])]


def gather_branch(p: str, transposed: bool) -> list:
    """y [T*K, H] from the selected experts' weights; W [E,2I,H] read as stored, or W1t/W2t [E,H,2I]/[E,I,H]."""
    if not transposed:
        return [node("Gather", ["W1", "ids_flat"], [p + "w1"], axis=0), node("Unsqueeze", ["xk", "axis2"], [p + "x"]),
                node("MatMul", [p + "w1", p + "x"], [p + "h"]), *silu_glu(p, p + "h", 1),
                node("Gather", ["W2", "ids_flat"], [p + "w2"], axis=0), node("MatMul", [p + "w2", p + "a"], [p + "y3"]),
                node("Squeeze", [p + "y3", "axis2"], [p + "y"])]
    return [node("Gather", ["W1t", "ids_flat"], [p + "w1"], axis=0), node("Unsqueeze", ["xk", "axis1"], [p + "x"]),
            node("MatMul", [p + "x", p + "w1"], [p + "h"]), *silu_glu(p, p + "h", 2),
            node("Gather", ["W2t", "ids_flat"], [p + "w2"], axis=0), node("MatMul", [p + "a", p + "w2"], [p + "y3"]),
            node("Squeeze", [p + "y3", "axis1"], [p + "y"])]


def dense_branch(p: str, form: str) -> list:
    """y [T*K, H] (the sum over all experts, tiled to the gather branch's shape: the size is what counts)."""
    if form == "Wxt":  # weights as stored, the left operand
        body = [node("Transpose", ["x"], [p + "xT"], perm=[1, 0]), node("MatMul", ["W1", p + "xT"], [p + "h"]),
                *silu_glu(p, p + "h", 1), node("MatMul", ["W2", p + "a"], [p + "y3"]),
                node("ReduceSum", [p + "y3", "axis0"], [p + "yT"], keepdims=0), node("Transpose", [p + "yT"], [p + "y1"], perm=[1, 0])]
    else:  # x @ Wᵀ, the transposes inside the branch or shared outside it
        w1t, w2t = ("W1t", "W2t") if form == "shared-Wt" else (p + "w1t", p + "w2t")
        body = [] if form == "shared-Wt" else [node("Transpose", ["W1"], [w1t], perm=[0, 2, 1]),
                                                node("Transpose", ["W2"], [w2t], perm=[0, 2, 1])]
        body += [node("MatMul", ["x", w1t], [p + "h"]), *silu_glu(p, p + "h", 2), node("MatMul", [p + "a", w2t], [p + "y3"]),
                 node("ReduceSum", [p + "y3", "axis0"], [p + "y1"], keepdims=0)]
    return body + [node("Tile", [p + "y1", "tile_k"], [p + "y"])]


def layer(form: str, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    hidden = w1.shape[2]
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "W1"), (w2, "W2"), (np.array([0]), "axis0"), (np.array([1]), "axis1"), (np.array([2]), "axis2"),
        (np.array([-1]), "minus1"), (np.array([1, K, 1]), "tile_rows"), (np.array([-1, hidden]), "rows_shape"),
        (np.array([K, 1]), "tile_k"), (np.array(THRESHOLD, np.int64), "threshold")]]
    nodes = [node("Reshape", ["ids", "minus1"], ["ids_flat"]), node("Unsqueeze", ["x", "axis1"], ["x1"]),
             node("Tile", ["x1", "tile_rows"], ["xk3"]), node("Reshape", ["xk3", "rows_shape"], ["xk"])]

    def branch(body, p):
        return helper.make_graph(body, p, [], [helper.make_tensor_value_info(p + "y", TensorProto.FLOAT16, None)])

    if form == "gather":
        nodes += [*gather_branch("g_", transposed=False), node("Identity", ["g_y"], ["y"])]
    elif form == "dense-xWt":
        nodes += [*dense_branch("d_", "xWt"), node("Identity", ["d_y"], ["y"])]
    else:
        shared = form == "auto-both-Wt"
        if shared:
            nodes += [node("Transpose", ["W1"], ["W1t"], perm=[0, 2, 1]), node("Transpose", ["W2"], ["W2t"], perm=[0, 2, 1])]
        few = branch(gather_branch("g_", transposed=shared), "g_")
        many = branch(dense_branch("d_", {"auto-xWt": "xWt", "auto-Wxt": "Wxt", "auto-both-Wt": "shared-Wt"}[form]), "d_")
        nodes += [node("Shape", ["x"], ["tokens1"], end=1), node("Squeeze", ["tokens1"], ["tokens"]),
                  node("LessOrEqual", ["tokens", "threshold"], ["few"]),
                  node("If", ["few"], ["y"], then_branch=few, else_branch=many)]
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", hidden]),
                                            helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def engine_bytes(t: compat.TensorRT, model: onnx.ModelProto, hidden: int) -> int:
    logger = t.trt.Logger(t.trt.Logger.ERROR)
    builder = t.trt.Builder(logger)
    network = t.network(builder)
    parser = t.trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        raise SystemExit(f"parse failed: {parser.get_error(0)}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, hidden), (4, hidden), (64, hidden))
    profile.set_shape("ids", (1, K), (4, K), (64, K))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config).nbytes


def ort_initializer_bytes(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(options.optimized_model_filepath)

    # ORT's CPU provider runs fp16 MatMul in fp32 (Cast inserted and folded): count elements at 2 bytes
    # so the figure compares copies, not dtypes.
    return sum(2 * int(np.prod(t.dims)) for g in all_graphs(optimised.graph) for t in g.initializer if np.prod(t.dims) > 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((args.experts, 2 * args.inter, args.hidden)) * 0.02).astype(np.float16)
    w2 = (rng.standard_normal((args.experts, args.hidden, args.inter)) * 0.02).astype(np.float16)
    weights = w1.nbytes + w2.nbytes
    t = compat.load()
    print(f"E={args.experts}, H={args.hidden}, I={args.inter}, top-{K}, fp16 weights {weights / 1e6:.1f} MB; "
          f"{t.describe()}, onnxruntime {ort.__version__}")
    print("| form | engine MB | engine / weights | ORT optimised initializers / weights |\n|---|---|---|---|")
    for form in FORMS:
        model = layer(form, w1, w2)
        size = engine_bytes(t, model, args.hidden)
        print(f"| {form} | {size / 1e6:.1f} | {size / weights:.3f} | {ort_initializer_bytes(model) / weights:.2f} |", flush=True)


if __name__ == "__main__":
    main()
