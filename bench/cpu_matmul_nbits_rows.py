"""ONNX Runtime's CPU MatMulNBits against fp32 MatMul by row count: what a quantized build's prefill pays.

    python bench/cpu_matmul_nbits_rows.py [--k 1024 --n 2048] [--rows 1,16,128] [--threads 2]

One [rows, K] x [K, N] product (the benchmark Qwen2-MoE's shapes by default: hidden 1024, a 2048-wide projection) as
a one-node session on the CPU provider: fp32 MatMul; com.microsoft:MatMulNBits with int8 and int4 codes (block 32,
quantize/packing.py's quantizer, the layout the ort form ships) at accuracy level 4 (int8 activations, what the ort
form emits) and 0 (fp32 activations); and DequantizeLinear (opset 21, blocked) feeding a MatMul, the portable form's
shape, which dequantizes the whole weight every run (graph optimizations off in every session: constant folding would
dequantize it once at load). Milliseconds a run, the median of `--reps` after one warm-up.
"""

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moe_compile.quantize.packing import quantize_rows

BLOCK = 32


def session(nodes, inits, k, n, threads):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # no constant folding: it would turn DequantizeLinear of an initializer into an fp32 weight at load time
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cases(w, threads, references):
    """The sessions by name; `references` gets each width's dequantized weight [N, K]."""
    n, k = w.shape
    out = {"fp32 MatMul": session([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                                  [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")], k, n, threads)}
    for bits in (8, 4):
        q = quantize_rows(w, bits, BLOCK, np.float32)
        scales = numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "S")
        for level in (4, 0):
            node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                    block_size=BLOCK, accuracy_level=level)
            out[f"int{bits} MatMulNBits level {level}"] = session([node], [numpy_helper.from_array(q.codes, "B"), scales],
                                                                  k, n, threads)
        # the portable form: signed codes [K, N] and scales [K / block, N], dequantized along K each run
        dtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
        codes = helper.make_tensor("C", dtype, [k, n], q.unpacked().T.flatten().tolist())
        dq = helper.make_node("DequantizeLinear", ["C", "DS"], ["W"], axis=0, block_size=BLOCK)
        dq_scales = numpy_helper.from_array(np.ascontiguousarray(q.scales.T.astype(np.float32)), "DS")
        out[f"int{bits} DequantizeLinear + MatMul"] = session([dq, helper.make_node("MatMul", ["A", "W"], ["Y"])],
                                                              [codes, dq_scales], k, n, threads)
        references[bits] = q.dequantize()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--rows", default="1,16,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.n, args.k)) / args.k**0.5).astype(np.float32)
    references = {}
    sessions = cases(w, args.threads, references)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"onnxruntime {ort.__version__}, K {args.k}, N {args.n}, block {BLOCK}, {args.threads} threads; ms a run")
    print("| op | " + " | ".join(f"{m} rows" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, s in sessions.items():
        times = []
        for m in rows:
            a = rng.standard_normal((m, args.k)).astype(np.float32)
            expected = a @ (references[int(name[3])] if name.startswith("int") else w).T
            got = s.run(None, {"A": a})[0]
            # the same product (level 4 rounds the activations to int8: ~1%)
            assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max(), name
            runs = []
            for _ in range(args.reps):
                start = time.perf_counter()
                s.run(None, {"A": a})
                runs.append(time.perf_counter() - start)
            times.append(statistics.median(runs) * 1e3)
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
