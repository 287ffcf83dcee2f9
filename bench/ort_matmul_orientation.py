"""ONNX Runtime CPU time of the dense lowering's gate/up GEMM in both orientations, one process:
`x @ Wᵀ` (the old form: Transpose of the weight, folded by ORT) and `W @ xᵀ` (the current form: the
weight as stored), each with the weight as an initializer and as a runtime input (which rules
ONNX Runtime's prepacking of constant operands in or out as the cause of a difference).

    python bench/ort_matmul_orientation.py [--experts 32] [--inter 512] [--hidden 1024] [--tokens 512]

Defaults: one layer of the benchmark Qwen2-MoE (docs/BENCHMARKS.md) at batch 4 × 128 tokens, fp32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPEATS = 5


def session(nodes, inputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "gemm", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def best_ms(sess: ort.InferenceSession, feeds: dict) -> float:
    sess.run(None, feeds)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--inter", type=int, default=512, help="expert intermediate size I (the GEMM has 2I rows)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    e, rows, h, t = args.experts, 2 * args.inter, args.hidden, args.tokens
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((e, rows, h)) * 0.02).astype(np.float32)
    x = rng.standard_normal((t, h)).astype(np.float32)
    value = helper.make_tensor_value_info
    x_in = value("x", TensorProto.FLOAT, ["T", h])
    cases = {
        "x @ Wᵀ, weight an initializer (Transpose folded)": session(
            [helper.make_node("Transpose", ["W"], ["Wt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
            [x_in], [numpy_helper.from_array(w, "W")]),
        "W @ xᵀ, weight an initializer": session(
            [helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]), helper.make_node("MatMul", ["W", "xT"], ["y"])],
            [x_in], [numpy_helper.from_array(w, "W")]),
        "x @ Wᵀ, weight a runtime input": session(
            [helper.make_node("MatMul", ["x", "Wt"], ["y"])], [x_in, value("Wt", TensorProto.FLOAT, [e, h, rows])], []),
        "W @ xᵀ, weight a runtime input": session(
            [helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]), helper.make_node("MatMul", ["W", "xT"], ["y"])],
            [x_in, value("W", TensorProto.FLOAT, [e, rows, h])], []),
    }
    feeds = {"x": x, "W": w, "Wt": np.ascontiguousarray(w.transpose(0, 2, 1))}
    print(f"E={e}, 2I={rows}, H={h}, T={t}, fp32, onnxruntime {ort.__version__}, best of {REPEATS}")
    print("| form | ms |\n|---|---|")
    for name, sess in cases.items():
        needed = {i.name: feeds[i.name] for i in sess.get_inputs()}
        print(f"| {name} | {best_ms(sess, needed):.1f} |")


if __name__ == "__main__":
    main()
