"""Where a T = 1 quantized MoE layer's time goes, block by block: %globaltimer stamps of each block's phases.

    python -m moe_compile.plugins.build --arch 90 --out DIR --define MOE_COMPILE_PHASES   # the stamps compiled in
    MOE_COMPILE_KERNELS_LIB=DIR/libmoe_compile_kernels.so python3 bench/moe_phases.py [--bits 4] [--no-shared]

A2.7B's routed experts (+ the shared expert), fp16 activations, block 32, over 8 weight copies, as
bench_fused_moe.py --quantized times them: 20 calls in a CUDA graph, replayed; the stamps of the last call's two
launches (thread 0 of each block, decode_mma.cu's phase()), in µs from the first gate/up block's start: per phase
the median block and the last one, for the routed and the shared gate/up blocks and the down blocks. Thread 0 is
in warp 0, the warp that routes the token in both launches; "values in" and "top-k chosen" are its steps inside
the routing (routing.cuh); the down launch's "routed" is where its warps with routed items have the routing."""

import argparse
import ctypes

import numpy as np
import torch

from moe_compile.plugins import library
from moe_compile.plugins.library import Dtype, GateUpLayout
from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
from moe_compile.quantize.packing import qmoe_weights, quantize_rows

GATE_UP = ["start", "waited", "routed", "rows done", "split sums", "written", "values in", "top-k chosen"]
DOWN = ["start", "routed", "items done", "waited", "written", "", "values in", "top-k chosen"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--no-shared", action="store_true")
    args = parser.parse_args()
    name = "qwen1.5-moe-a2.7b"
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    h, inter, e, block, bits = shape.hidden, shape.intermediate, shape.num_experts, 32, args.bits
    shared_i = 4 * inter
    gen = torch.Generator().manual_seed(0)
    parts = []
    for rows, cols, qmoe in ((e * 2 * inter, h, True), (e * h, inter, True), (2 * shared_i, h, False),
                             (h, shared_i, False)):
        w = (torch.randn(rows, cols, generator=gen) / cols**0.5).numpy()
        q = quantize_rows(w.reshape(e, -1, cols) if qmoe else w, bits, block, np.float16)
        codes, scales = qmoe_weights(q) if qmoe else (q.codes, q.scales)
        parts += [torch.from_numpy(np.ascontiguousarray(codes)).cuda(), torch.from_numpy(scales).cuda()]
    sets = [parts] + [[t.clone() for t in parts] for _ in range(7)]
    hidden = torch.randn(1, h, device="cuda").half()
    logits = torch.randn(1, e, device="cuda")
    gate_logits = torch.randn(1, device="cuda")
    c_shape = library.shape_c(1, h, inter, e, Dtype.F16, GateUpLayout.INTERLEAVED)
    out = torch.empty_like(hidden)

    def experts(w):
        shared = None if args.no_shared else library.SharedExpert(shared_i, w[4].data_ptr(), w[6].data_ptr(),
                                                                   gate_logits.data_ptr())
        quant = library.QuantizedExperts(bits, block, w[1].data_ptr(), w[3].data_ptr(),
                                         None if args.no_shared else w[5].data_ptr(),
                                         None if args.no_shared else w[7].data_ptr())
        return shared, quant

    shared, quant = experts(parts)
    size = library.workspace_size_quantized(c_shape, routing, quant, shared)
    ws = torch.empty(size, dtype=torch.uint8, device="cuda")
    turn = iter(range(10**9))

    def call():
        w = sets[next(turn) % len(sets)]
        shared, quant = experts(w)
        library.forward_quantized(c_shape, routing, quant, hidden.data_ptr(), logits.data_ptr(), None,
                                  w[0].data_ptr(), w[2].data_ptr(), out.data_ptr(), ws.data_ptr(), size,
                                  torch.cuda.current_stream().cuda_stream, shared)

    lib = library.load()
    if not hasattr(lib, "moe_compile_phase_times"):
        raise SystemExit("moe_phases.py: the kernel library has no stamps: build it with --define MOE_COMPILE_PHASES "
                         "and point MOE_COMPILE_KERNELS_LIB at it")
    lib.moe_compile_phase_times.argtypes = [ctypes.c_void_p, ctypes.c_int]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            call()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    for rep in range(3):
        assert lib.moe_compile_phase_times(None, 1) == 0
        graph.replay()
        torch.cuda.synchronize()
        stamps = np.zeros((2, 1024, 8), np.uint64)
        assert lib.moe_compile_phase_times(stamps.ctypes.data, 0) == 0
        report(stamps, routing.top_k, routing.top_k + (0 if args.no_shared else shared_i // inter), rep)


def report(stamps, routed_grid, grid_x, rep):
    gu, down = stamps[0].astype(np.int64), stamps[1].astype(np.int64)
    used = gu[:, 0] > 0
    t0 = gu[used, 0].min()
    blocks = np.nonzero(used)[0]
    routed = blocks[blocks % grid_x < routed_grid]
    shared = blocks[blocks % grid_x >= routed_grid]
    us = lambda v: (v - t0) / 1e3
    print(f"replay {rep}: gate/up blocks {len(blocks)} (routed {len(routed)}, shared {len(shared)}), "
          f"down blocks {int((down[:, 0] > 0).sum())}; timer steps seen (ns): "
          f"{np.unique(np.diff(np.unique(gu[used, :].ravel()[gu[used, :].ravel() > 0])))[:5]}")
    for label, rows, names in (("gate/up routed", gu[routed], GATE_UP), ("gate/up shared", gu[shared], GATE_UP),
                               ("down", down[down[:, 0] > 0], DOWN)):
        cells = []
        for i, phase in enumerate(names):
            v = rows[:, i]
            v = v[v > 0]
            if phase and len(v):
                cells.append(f"{phase} {np.median(us(v)):.2f} / {us(v).max():.2f}")
        print(f"  {label:15s} (median / last µs): " + ", ".join(cells))


if __name__ == "__main__":
    main()
