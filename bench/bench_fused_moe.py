"""Benchmark the fused MoE kernels against transformers' experts implementations on one GPU.

    PYTHONUNBUFFERED=1 python bench/bench_fused_moe.py [--tokens 1,8,64,512,2048] [--json out.json]
        [--shared 1,8] [--quantized 1,8,64] [--projections 1,16,128] [--alternate VAR=a,b]

For each model shape (model_shapes.SHAPES) and token count: median time (triton do_bench, L2
flushed before every repetition), weight bytes of the selected experts over time (GB/s) and
expert FLOPs over time (TFLOP/s), next to the ceilings measured in the same run: a device-to-device
copy (bytes read + written) and an 8192^3 bf16 matmul. Compared: transformers' `batched_mm` and
`grouped_mm` experts forwards (integrations/moe.py) on a Qwen2MoeExperts module holding the same
weights, with torch routing (softmax -> top-k -> renorm) in front, as the model runs it; ONNX
Runtime's com.microsoft:MoE on the CUDA provider (one-node model, weights as initializers, inputs
and output bound to torch's buffers; its time includes ORT's per-run host work, as a session runs
it); ours takes the router logits and routes inside, as does ORT's.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton.testing

from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
from moe_compile.plugins.torch_ops import fused_moe

BATCHED_MM_GATHER_LIMIT = 16e9  # batched_mm copies each token's expert weights: skip beyond this


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6  # GB/s


def matmul_rate() -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def transformers_experts(shape, routing, gate_up, down):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = Qwen2MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                            num_experts=shape.num_experts, num_experts_per_tok=routing.top_k)
    with torch.device("meta"):
        experts = Qwen2MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)

    def run(impl, hidden, logits):
        experts.config._experts_implementation = impl
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, routing.top_k, dim=-1)
        if routing.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return experts(hidden, ids, weights.to(hidden.dtype))

    return run


def ort_moe(shape, routing, gate_up, down, workdir):
    """ONNX Runtime's com.microsoft:MoE on the CUDA provider holding the same weights as
    initializers (external data: Mixtral's are 2.8 GB), fed through IOBinding from torch's
    buffers. Returns run(hidden, logits, out), or None with the reason when it cannot run."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, f"onnxruntime {ort.__version__} has no CUDA provider"
    e, i, h = shape.num_experts, shape.intermediate, shape.hidden
    fc1 = gate_up.view(e, 2, i, h).transpose(1, 2).reshape(e, 2 * i, h)  # interleaved rows (swiglu_fusion=1)

    def initializer(name, t):
        proto = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(t.shape))
        proto.raw_data = t.contiguous().view(torch.int16).cpu().numpy().tobytes()
        return proto

    node = helper.make_node("MoE", ["x", "r", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=routing.top_k,
                            normalize_routing_weights=int(routing.renormalize), activation_type="swiglu",
                            swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, use_sparse_mixer=0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["T", h]),
                                              helper.make_tensor_value_info("r", TensorProto.BFLOAT16, ["T", e])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["T", h])],
                              [initializer("fc1", fc1), initializer("fc2", down)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path = Path(workdir) / f"moe-{shape.name}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    del model, graph
    try:
        options = ort.SessionOptions()
        # The GPU does the work: idle ORT threads must not spin on the cores the other rows' hosts use.
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (ORT raises its own types; the reason goes in the table)
        return None, str(exc).splitlines()[0][:200]
    bf16 = TensorProto.BFLOAT16

    def run(hidden, logits, out):
        binding = session.io_binding()
        binding.bind_input("x", "cuda", 0, bf16, list(hidden.shape), hidden.data_ptr())
        binding.bind_input("r", "cuda", 0, bf16, list(logits.shape), logits.data_ptr())
        binding.bind_output("y", "cuda", 0, bf16, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return run, None


def bench_shape(name, tokens, rows, ours_only=False, workdir=None):
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda", generator=gen)
               / shape.hidden**0.5).bfloat16()
    down = (torch.randn(shape.num_experts, shape.hidden, shape.intermediate, device="cuda", generator=gen)
            / shape.intermediate**0.5).bfloat16()
    theirs = transformers_experts(shape, routing, gate_up, down)
    ort_run, ort_reason = (None, "not asked") if ours_only or workdir is None else ort_moe(shape, routing, gate_up,
                                                                                           down, workdir)
    if ort_reason and ort_reason != "not asked":
        print(f"ORT com.microsoft:MoE ({name}): not timed: {ort_reason}", flush=True)
    expert_bytes = 3 * shape.hidden * shape.intermediate * 2
    for t in tokens:
        hidden = torch.randn(t, shape.hidden, device="cuda", generator=gen).bfloat16()
        logits = torch.randn(t, shape.num_experts, device="cuda", generator=gen).bfloat16()
        ids = torch.topk(logits.float(), routing.top_k, dim=-1).indices
        weight_bytes = torch.unique(ids).numel() * expert_bytes
        flops = 2 * t * routing.top_k * 3 * shape.hidden * shape.intermediate
        row = {"shape": name, "T": t, "weight_bytes": weight_bytes, "flops": flops}
        row["ours_ms"] = bench(lambda: fused_moe(hidden, logits, gate_up, down, routing))
        if ours_only:
            print(f"| {name:18s} | {t:5d} | {row['ours_ms'] * 1e3:9.1f} | {weight_bytes / row['ours_ms'] / 1e6:7.0f} |")
            continue
        if t * routing.top_k * expert_bytes <= BATCHED_MM_GATHER_LIMIT:
            row["batched_mm_ms"] = bench(lambda: theirs("batched_mm", hidden, logits))
        row["grouped_mm_ms"] = bench(lambda: theirs("grouped_mm", hidden, logits))
        if ort_run is not None:
            ort_out = torch.empty_like(hidden)
            ours_out = fused_moe(hidden, logits, gate_up, down, routing)
            # Same weights, same routing: the two must agree before their times mean anything.
            row["ort_rel_err"] = ((ort_run(hidden, logits, ort_out).float() - ours_out.float()).norm()
                                  / ours_out.float().norm()).item()
            row["ort_moe_ms"] = bench(lambda: ort_run(hidden, logits, ort_out))
        rows.append(row)
        print_row(row)
    del gate_up, down
    torch.cuda.empty_cache()


def kernel_breakdown(name, t):
    """Per-kernel device time of our op (torch profiler, 20 calls): where the microseconds go."""
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gate_up = torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda").bfloat16()
    down = torch.randn(shape.num_experts, shape.hidden, shape.intermediate, device="cuda").bfloat16()
    hidden = torch.randn(t, shape.hidden, device="cuda").bfloat16()
    logits = torch.randn(t, shape.num_experts, device="cuda").bfloat16()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fused_moe(hidden, logits, gate_up, down, routing)

    def call():
        flush.zero_()  # weights come from HBM, as in the timed runs
        fused_moe(hidden, logits, gate_up, down, routing)

    print(f"kernel breakdown {name} T={t} (µs per call):")
    for kernel, us in kernel_times(call).items():
        if "zero" not in kernel and "fill" not in kernel.lower():
            print(f"  {us:8.1f}  {kernel}")


def graph_us(fn, calls=20) -> float:
    """Device microseconds a call, from a CUDA graph of `calls` calls replayed (no host launch cost in it,
    as ONNX Runtime's CUDA-graph replay runs them)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture (cuBLAS handles, lazy kernel loading)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench(graph.replay) * 1e3 / calls


def settings_us(fn, calls, alternate, differs) -> dict[str, list[float]]:
    """graph_us of fn under each value of the environment variable `alternate` = (VAR, values), read by the
    library per call: the values in order, then in reverse (A B B A). Under each, `differs()` (a call of fn against
    the first run's output: relative norm of the difference) must stay within 1e-3: a setting may add in another
    order, never compute something else. {"": [µs]} under the environment as it is."""
    if not alternate:
        return {"": [graph_us(fn, calls)]}
    var, values = alternate
    times = {v: [] for v in values}
    for value in values + values[::-1]:
        with mock.patch.dict(os.environ, {var: value}):
            times[value].append(graph_us(fn, calls))
            rel = differs()
        if not rel <= 1e-3:
            raise SystemExit(f"{var}={value} changed the output: {rel:.1e} relative")
    return {f"{var}={v}": us for v, us in times.items()}


def bench_shared(tokens):
    """A2.7B with its shared expert (I_s = 5632), fp16 as the ort form runs it, timed as CUDA-graph replays: the
    shared expert inside our kernels (moe_shared_expert) against our routed kernels + the shared expert as
    cuBLAS matmuls and elementwise ops (the graph before the swap took it over). Bytes = selected experts +
    shared expert."""
    from moe_compile.plugins import library
    from moe_compile.plugins.library import Dtype

    name = "qwen1.5-moe-a2.7b"
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, inter, e, si = shape.hidden, shape.intermediate, shape.num_experts, 4 * shape.intermediate
    gate_up = (torch.randn(e, 2 * inter, h, device="cuda", generator=gen) / h**0.5).half()
    down = (torch.randn(e, h, inter, device="cuda", generator=gen) / inter**0.5).half()
    s_gate_up = (torch.randn(2 * si, h, device="cuda", generator=gen) / h**0.5).half()
    s_down = (torch.randn(h, si, device="cuda", generator=gen) / si**0.5).half()
    s_gate = (torch.randn(1, h, device="cuda", generator=gen) / h**0.5).half()
    print("| shared, fp16 |     T | routed only µs | inside ours µs | GB/s | ours + cuBLAS µs | GB/s | rel diff |")
    for t in tokens:
        hidden = torch.randn(t, h, device="cuda", generator=gen).half()
        logits = torch.randn(t, e, device="cuda", generator=gen)
        gate_logits = (hidden @ s_gate.T).float().flatten()
        c_shape = library.shape_c(t, h, inter, e, Dtype.F16)
        shared = library.SharedExpert(si, s_gate_up.data_ptr(), s_down.data_ptr(), gate_logits.data_ptr())
        out = torch.empty_like(hidden)

        def ours(with_shared):
            size = library.workspace_size(c_shape, routing, with_shared)
            ws = torch.empty(size, dtype=torch.uint8, device="cuda")
            return lambda: library.forward(c_shape, routing, hidden.data_ptr(), logits.data_ptr(), None,
                                           gate_up.data_ptr(), down.data_ptr(), out.data_ptr(), ws.data_ptr(), size,
                                           torch.cuda.current_stream().cuda_stream, with_shared)

        routed, inside = ours(None), ours(shared)
        routed_out = torch.empty_like(hidden)

        def apart():
            routed()
            routed_out.copy_(out)
            gu = hidden @ s_gate_up.T
            a = torch.nn.functional.silu(gu[:, :si]) * gu[:, si:]
            return routed_out + torch.sigmoid(hidden @ s_gate.T) * (a @ s_down.T)

        expected = apart().float()
        inside()
        diff = ((out.float() - expected).norm() / expected.norm()).item()
        ids = torch.topk(logits, routing.top_k, dim=-1).indices
        nbytes = (torch.unique(ids).numel() + 4) * 3 * h * inter * 2
        us_routed, us_in, us_apart = graph_us(routed), graph_us(inside), graph_us(apart)
        print(f"| shared, fp16 | {t:5d} | {us_routed:14.1f} | {us_in:14.1f} | {nbytes / us_in / 1e3:4.0f} | "
              f"{us_apart:16.1f} | {nbytes / us_apart / 1e3:4.0f} | {diff:.1e} |", flush=True)


def bench_quantized(tokens, block=32, copies=8, alternate=None):
    """A2.7B's routed experts, fp16 activations, timed as CUDA-graph replays: ours on fp16 weights against ours
    on int8 and int4 codes (block `block`, quantize/packing.py's quantizer, com.microsoft:QMoE's layout), alone
    and with the shared expert (I_s = 5632, gated; quantized as MatMulNBits holds it) in the same launches.
    Each call reads the next of `copies` copies of the weights, so that L2 holds none of them, as a 24-layer
    decode step finds a layer's weights. Bytes = the selected experts' weights (and the shared expert's) as each
    stores them (codes + fp16 scales)."""
    import numpy as np

    from moe_compile.plugins import library
    from moe_compile.plugins.library import Dtype, GateUpLayout
    from moe_compile.quantize.packing import qmoe_weights, quantize_rows

    name = "qwen1.5-moe-a2.7b"
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gen = torch.Generator().manual_seed(0)
    h, inter, e = shape.hidden, shape.intermediate, shape.num_experts
    shared_i = 4 * inter
    gate_up = (torch.randn(e, 2 * inter, h, generator=gen) / h**0.5).half()  # rows interleaved: it does not matter here
    down = (torch.randn(e, h, inter, generator=gen) / inter**0.5).half()
    shared_gate_up = (torch.randn(2 * shared_i, h, generator=gen) / h**0.5).half()
    shared_down = (torch.randn(h, shared_i, generator=gen) / shared_i**0.5).half()
    weights = {"fp16": [w.cuda() for w in (gate_up, down, shared_gate_up, shared_down)]}
    for bits in (8, 4):
        parts = []
        for w in (gate_up, down):
            codes, scales = qmoe_weights(quantize_rows(w.float().numpy(), bits, block, np.float16))
            parts += [torch.from_numpy(np.ascontiguousarray(codes)).cuda(), torch.from_numpy(scales).cuda()]
        for w in (shared_gate_up, shared_down):  # MatMulNBits' [N, K/block, blob]
            q = quantize_rows(w.float().numpy(), bits, block, np.float16)
            parts += [torch.from_numpy(q.codes).cuda(), torch.from_numpy(q.scales).cuda()]
        weights[f"int{bits}"] = parts
    print(f"| quantized A2.7B experts, fp16 activations, block {block} |     T | format | shared | ours µs | GB/s | "
          f"rel diff to fp16 |")
    stream = lambda: torch.cuda.current_stream().cuda_stream
    for t in tokens:
        hidden = torch.randn(t, h, device="cuda").half()
        logits = torch.randn(t, e, device="cuda")
        gate_logits = torch.randn(t, device="cuda")
        c_shape = library.shape_c(t, h, inter, e, Dtype.F16, GateUpLayout.INTERLEAVED)
        experts = torch.unique(torch.topk(logits, routing.top_k, dim=-1).indices).numel()
        for with_shared in (False, True):
            results = {}
            for fmt, w in weights.items():
                out = torch.empty_like(hidden)
                bits = 16 if fmt == "fp16" else int(fmt[3:])
                per_weight = 2 if fmt == "fp16" else bits / 8 + 2 / block
                nbytes = (experts * 3 * h * inter + with_shared * 3 * h * shared_i) * per_weight
                sets = [w] + [[part.clone() for part in w] for _ in range(copies - 1)]
                turn = iter(range(10**9))
                if fmt == "fp16":
                    def shared_of(w, with_shared=with_shared):
                        return library.SharedExpert(shared_i, w[2].data_ptr(), w[3].data_ptr(),
                                                    gate_logits.data_ptr()) if with_shared else None

                    size = library.workspace_size(c_shape, routing, shared_of(w))
                    ws = torch.empty(size, dtype=torch.uint8, device="cuda")

                    def fn(sets=sets, out=out, ws=ws, size=size, shared_of=shared_of):
                        w = sets[next(turn) % len(sets)]
                        library.forward(c_shape, routing, hidden.data_ptr(), logits.data_ptr(), None, w[0].data_ptr(),
                                        w[1].data_ptr(), out.data_ptr(), ws.data_ptr(), size, stream(), shared_of(w))
                else:
                    def parts(w, with_shared=with_shared, bits=bits):
                        shared = library.SharedExpert(shared_i, w[4].data_ptr(), w[6].data_ptr(),
                                                      gate_logits.data_ptr()) if with_shared else None
                        quant = library.QuantizedExperts(bits, block, w[1].data_ptr(), w[3].data_ptr(),
                                                         w[5].data_ptr() if with_shared else None,
                                                         w[7].data_ptr() if with_shared else None)
                        return shared, quant

                    shared, quant = parts(w)
                    size = library.workspace_size_quantized(c_shape, routing, quant, shared)
                    ws = torch.empty(size, dtype=torch.uint8, device="cuda")

                    def fn(sets=sets, out=out, ws=ws, size=size, parts=parts):
                        w = sets[next(turn) % len(sets)]
                        shared, quant = parts(w)
                        library.forward_quantized(c_shape, routing, quant, hidden.data_ptr(), logits.data_ptr(), None,
                                                  w[0].data_ptr(), w[2].data_ptr(), out.data_ptr(), ws.data_ptr(), size,
                                                  stream(), shared)
                fn()
                torch.cuda.synchronize()
                results[fmt] = out.float()
                ref = results["fp16"]
                diff = ((out.float() - ref).norm() / ref.norm()).item()
                first = out.float()
                differs = lambda fn=fn, out=out, first=first: (
                    fn(), ((out.float() - first).norm() / first.norm()).item())[1]
                timed = settings_us(fn, max(20, copies), alternate if fmt != "fp16" else None, differs)
                for setting, times in timed.items():
                    us = sum(times) / len(times)
                    print(f"| quantized | {t:5d} | {fmt:6s} | {'yes' if with_shared else 'no':6s} | "
                          f"{' / '.join(f'{u:.1f}' for u in times)} {setting} | {nbytes / us / 1e3:4.0f} | {diff:.1e} |",
                          flush=True)
                kernels = kernel_times(fn)
                print("    " + ", ".join(f"{k} {v:.1f}" for k, v in kernels.items()), flush=True)


def bench_projections(tokens, block=32, alternate=None):
    """A2.7B's dense projections (q/k/v packed, o, the LM head), fp16 activations, timed as CUDA-graph replays: the
    fp16 weight on cuBLAS (torch's matmul, as ONNX Runtime's MatMul runs it) against our quantized matmul on its int8
    and int4 codes (com.microsoft:MatMulNBits' layout; bias added inside). Each call reads the next of enough copies
    of the weights that L2 holds none of them, as a decode step finds a layer's weights. Bytes = codes + scales."""
    import numpy as np

    from moe_compile.plugins.torch_ops import quantized_matmul_cuda
    from moe_compile.quantize.packing import quantize_rows

    h = SHAPES["qwen1.5-moe-a2.7b"].hidden
    gen = torch.Generator().manual_seed(0)
    print(f"| A2.7B projection, fp16 activations, block {block} |     T | format | µs | GB/s | rel diff to fp16 |")
    for name, n in (("q/k/v", 3 * h), ("o", h), ("lm_head", 151936)):
        w = (torch.randn(n, h, generator=gen) / h**0.5).half()
        bias = torch.randn(n, device="cuda").half()
        formats = {"fp16": (w.cuda(),)}
        for bits in (8, 4):
            q = quantize_rows(w.float().numpy(), bits, block, np.float16)
            formats[f"int{bits}"] = (torch.from_numpy(q.codes).cuda(), torch.from_numpy(q.scales).cuda(), bits)
        for t in tokens:
            x = torch.randn(t, h, device="cuda").half()
            ref = None
            for fmt, parts in formats.items():
                nbytes = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
                copies = [parts] + [tuple(p.clone() if isinstance(p, torch.Tensor) else p for p in parts)
                                    for _ in range(max(0, min(31, -(-256 * 2**20 // nbytes) - 1)))]
                turn = iter(range(10**9))
                if fmt == "fp16":
                    fn = lambda copies=copies: torch.addmm(bias, x, copies[next(turn) % len(copies)][0].T)
                else:
                    fn = lambda copies=copies: quantized_matmul_cuda(x, *copies[next(turn) % len(copies)][:2], bias,
                                                                     copies[0][2], block)
                out = fn().float()
                ref = out if ref is None else ref
                diff = ((out - ref).norm() / ref.norm()).item()
                differs = lambda fn=fn, out=out: ((fn().float() - out).norm() / out.norm()).item()
                timed = settings_us(fn, max(20, len(copies)), alternate if fmt != "fp16" else None, differs)
                for setting, times in timed.items():
                    us = sum(times) / len(times)
                    print(f"| {name} {n} x {h} | {t:5d} | {fmt:6s} | {' / '.join(f'{u:.1f}' for u in times)} "
                          f"{setting} | {nbytes / us / 1e3:4.0f} | {diff:.1e} |", flush=True)
            del copies


def bench_router(tokens, copies=256):
    """A2.7B's router with the shared-expert gate (2048 x 61, fp16), timed as CUDA-graph replays: cuBLAS (torch's
    matmul, as ONNX Runtime's MatMul runs it) and the conversion of its output to float32 that the fused op then ran,
    against our one launch (fused_moe.h: moe_compile_router_logits), serialised (MOE_COMPILE_PROGRAMMATIC_LAUNCH=0:
    a launch of ours would otherwise overlap the one before, its own kind here). Each call reads the next of `copies`
    copies of the weight, so that L2 holds none of them, as a decode step finds a layer's router."""
    from moe_compile.plugins import library
    from moe_compile.plugins.library import Dtype

    h, e = SHAPES["qwen1.5-moe-a2.7b"].hidden, SHAPES["qwen1.5-moe-a2.7b"].num_experts
    weights = [(torch.randn(h, e + 1, device="cuda") / h**0.5).half() for _ in range(copies)]
    rows = [w.T.contiguous() for w in weights]
    stream = lambda: torch.cuda.current_stream().cuda_stream
    print("| A2.7B router + shared gate, fp16 |     T | cuBLAS + to fp32 µs | ours µs | max abs diff |")
    with mock.patch.dict(os.environ, {"MOE_COMPILE_PROGRAMMATIC_LAUNCH": "0"}):
        for t in tokens:
            x = torch.randn(t, h, device="cuda").half()
            logits, gate = torch.empty(t, e, device="cuda"), torch.empty(t, device="cuda")
            turn = iter(range(10**9))
            theirs = lambda: (x @ weights[next(turn) % copies]).float()
            ours = lambda: library.router_logits(x.data_ptr(), rows[next(turn) % copies].data_ptr(), Dtype.F16, t, h,
                                                 e, logits.data_ptr(), gate.data_ptr(), stream())
            expected = (x @ weights[0]).float()
            library.router_logits(x.data_ptr(), rows[0].data_ptr(), Dtype.F16, t, h, e, logits.data_ptr(),
                                  gate.data_ptr(), stream())
            diff = (torch.cat([logits, gate[:, None]], 1) - expected).abs().max().item()
            print(f"| router {h} x {e + 1} | {t:5d} | {graph_us(theirs, copies):7.1f} | {graph_us(ours, copies):7.1f} | "
                  f"{diff:.1e} |", flush=True)


def kernel_times(fn, calls=20) -> dict[str, float]:
    """Device µs a call of each kernel `fn` launches (torch profiler), by the kernel's name up to its template."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {ev.key.split("<")[0].removeprefix("void ").removeprefix("moe::")[:40]: ev.device_time_total / calls
            for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total) if ev.device_time_total > 0}


def print_row(r):
    ms = r["ours_ms"]
    others = {k: r[k] for k in ("batched_mm_ms", "grouped_mm_ms", "ort_moe_ms") if k in r}
    best_other = min(others.values())
    fmt = lambda k: f"{r[k] * 1e3:9.1f}" if k in r else "     skip"
    ort_err = f"{r['ort_rel_err']:.1e}" if "ort_rel_err" in r else "-"
    print(f"| {r['shape']:18s} | {r['T']:5d} | {ms * 1e3:9.1f} | {r['weight_bytes'] / ms / 1e6:7.0f} | "
          f"{r['flops'] / ms / 1e9:7.1f} | {fmt('batched_mm_ms')} | {fmt('grouped_mm_ms')} | {fmt('ort_moe_ms')} "
          f"({ort_err}) | {best_other / ms:6.2f}x |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,64,512,2048")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="also write the rows and ceilings here")
    parser.add_argument("--ours-only", action="store_true", help="time only the fused kernels")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's com.microsoft:MoE (CUDA provider)")
    parser.add_argument("--workdir", default=None, help="where the ORT models' weights are written (default: tmp)")
    parser.add_argument("--breakdown", default="", help="shape:T pairs to profile per kernel, e.g. qwen1.5-moe-a2.7b:1")
    parser.add_argument("--shared", default="", help="token counts for the A2.7B shared-expert comparison, e.g. 1,8")
    parser.add_argument("--quantized", default="", help="token counts for A2.7B's experts as fp16/int8/int4, e.g. 1,8")
    parser.add_argument("--projections", default="", help="token counts for A2.7B's dense projections as fp16/int8/int4")
    parser.add_argument("--router", default="", help="token counts for A2.7B's router: cuBLAS + conversion against ours")
    parser.add_argument("--alternate", default="", help="VAR=a,b: time --quantized and --projections under each value "
                        "of the library's environment variable VAR, in the order a b b a, in one process")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    import transformers

    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__}"
          f" | triton {triton.__version__}")
    print(f"ceilings: copy {bandwidth:.0f} GB/s (read+write), bf16 matmul 8192^3 {rate:.0f} TFLOP/s")
    print("| shape              |     T |  ours µs |    GB/s | TFLOP/s | batched_mm µs | grouped_mm µs | "
          "ORT MoE µs (rel. diff to ours) | vs best |")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for name in filter(None, args.shapes.split(",")):
            bench_shape(name, [int(t) for t in args.tokens.split(",")], rows, args.ours_only,
                        None if args.no_ort else workdir)
    if args.shared:
        bench_shared([int(t) for t in args.shared.split(",")])
    alternate = None
    if args.alternate:
        var, _, values = args.alternate.partition("=")
        alternate = (var, values.split(","))
    if args.quantized:
        bench_quantized([int(t) for t in args.quantized.split(",")], alternate=alternate)
    if args.projections:
        bench_projections([int(t) for t in args.projections.split(",")], alternate=alternate)
    if args.router:
        bench_router([int(t) for t in args.router.split(",")])
    for pair in filter(None, args.breakdown.split(",")):
        name, t = pair.split(":")
        kernel_breakdown(name, int(t))
    if args.ours_only:
        return 0
    a27 = {r["T"]: r for r in rows if r["shape"] == "qwen1.5-moe-a2.7b"}
    if 1 in a27:
        r = a27[1]
        print(f"target T=1 A2.7B: {r['weight_bytes'] / r['ours_ms'] / 1e6 / bandwidth:.0%} of copy bandwidth (>= 75%)")
    for r in rows:
        if r["T"] == 2048:
            print(f"target T=2048 {r['shape']}: {r['flops'] / r['ours_ms'] / 1e9 / rate:.0%} of bf16 matmul (>= 50%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": bandwidth, "matmul_TFLOPs": rate, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
