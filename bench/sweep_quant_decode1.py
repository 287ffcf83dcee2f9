"""Batch-1 decode of A2.7B's quantized experts (the shared expert inside) across kernel settings, on one GPU.

    python bench/sweep_quant_decode1.py build OUT_DIR NAME=FLAGS...   # here or there: a library per setting
    python bench/sweep_quant_decode1.py time LIB_DIR...                # on the GPU

`build` compiles the kernel library once per setting for sm_90, each setting a set of the MOE_Q1_* macros of
decode_mma.cu (e.g. `pipe="-DMOE_Q1_KSPLIT=1 -DMOE_Q1_GU_PIPE=true"`), into OUT_DIR/NAME/. `time` loads each
library in turn and times one MoE layer at T = 1 (int4 and int8, block 32, fp16 activations, routed experts and
the gated shared expert in the same launches) as CUDA-graph replays over `--layers` copies of the weights, so
that no call finds the previous call's weights in L2 (50 MB on the H200; one int4 layer's active weights are
39 MB), as a 24-layer step does not. Prints µs a layer, GB/s over the bytes the layer must read, each kernel's
µs, and the relative difference to the first library's output (the settings change only the order of sums), with
the down launch started early (programmatic dependent launch) and not.
"""

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def build(out_dir: Path, settings: list[str]) -> None:
    from moe_compile.plugins.build import LIBRARY_NAME, NVCC_FLAGS, SOURCE_DIR, find_nvcc

    nvcc = find_nvcc()
    arch = ["-gencode=arch=compute_90,code=sm_90"]
    common = out_dir / "common"
    common.mkdir(parents=True, exist_ok=True)
    sources = sorted(SOURCE_DIR.glob("*.cu"))
    jobs = []  # (source, object, defines)
    for src in sources:
        if src.name != "decode_mma.cu":
            jobs.append((src, common / f"{src.stem}.o", []))
    for setting in settings:
        name, _, flags = setting.partition("=")
        (out_dir / name).mkdir(exist_ok=True)
        jobs.append((SOURCE_DIR / "decode_mma.cu", out_dir / name / "decode_mma.o", flags.split()))
    run = lambda job: subprocess.run([nvcc, *NVCC_FLAGS, *arch, *job[2], "-c", str(job[0]), "-o", str(job[1])],
                                     check=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(run, jobs))
    for setting in settings:
        name, _, flags = setting.partition("=")
        objects = [str(common / f"{s.stem}.o") for s in sources if s.name != "decode_mma.cu"]
        subprocess.run([nvcc, "-shared", *arch, *objects, str(out_dir / name / "decode_mma.o"), "-o",
                        str(out_dir / name / LIBRARY_NAME)], check=True)
        (out_dir / name / "flags").write_text(flags)
        print(name, flags, flush=True)


def time_libraries(lib_dirs: list[Path], layers: int, block: int, programmatic: list[str]) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fused_moe import bench, kernel_times

    from moe_compile.plugins import library
    from moe_compile.plugins.library import Dtype, GateUpLayout
    from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
    from moe_compile.quantize.packing import qmoe_weights, quantize_rows

    name = "qwen1.5-moe-a2.7b"
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    h, inter, e = shape.hidden, shape.intermediate, shape.num_experts
    shared_i = 4 * inter
    gen = torch.Generator().manual_seed(0)
    floats = [(torch.randn(e, 2 * inter, h, generator=gen) / h**0.5), (torch.randn(e, h, inter, generator=gen) / inter**0.5),
              (torch.randn(2 * shared_i, h, generator=gen) / h**0.5), (torch.randn(h, shared_i, generator=gen) / shared_i**0.5)]
    formats = {}
    for bits in (4, 8):
        parts = []
        for i, w in enumerate(floats):
            q = quantize_rows(w.half().float().numpy(), bits, block, np.float16)
            codes, scales = qmoe_weights(q) if i < 2 else (q.codes, q.scales)
            parts += [torch.from_numpy(np.ascontiguousarray(codes)).cuda(), torch.from_numpy(scales).cuda()]
        # more copies of the same bytes: each call reads its own, so none finds its weights in L2
        formats[f"int{bits}"] = [parts] + [[p.clone() for p in parts] for _ in range(layers - 1)]
    hidden = torch.randn(1, h, device="cuda").half()
    logits = torch.randn(1, e, device="cuda")
    gate_logits = torch.randn(1, device="cuda")
    c_shape = library.shape_c(1, h, inter, e, Dtype.F16, GateUpLayout.INTERLEAVED)
    stream = lambda: torch.cuda.current_stream().cuda_stream
    reference = {}
    print(f"| setting | programmatic | format | µs a layer | GB/s | gate_up µs | down µs | rel diff to {lib_dirs[0].name} "
          f"| flags |")
    for lib_dir, early in ((d, e) for d in lib_dirs for e in programmatic):
        os.environ["MOE_COMPILE_KERNELS_LIB"] = str(lib_dir / "libmoe_compile_kernels.so")
        os.environ["MOE_COMPILE_PROGRAMMATIC_LAUNCH"] = early
        library.load.cache_clear()
        for fmt, copies in formats.items():
            bits = int(fmt[3:])
            nbytes = (routing.top_k * 3 * h * inter + 3 * h * shared_i) * (bits / 8 + 2 / block)
            outs = [torch.empty_like(hidden) for _ in copies]
            calls = []
            for w, out in zip(copies, outs):
                shared = library.SharedExpert(shared_i, w[4].data_ptr(), w[6].data_ptr(), gate_logits.data_ptr())
                quant = library.QuantizedExperts(bits, block, w[1].data_ptr(), w[3].data_ptr(), w[5].data_ptr(),
                                                 w[7].data_ptr())
                size = library.workspace_size_quantized(c_shape, routing, quant, shared)
                ws = torch.empty(size, dtype=torch.uint8, device="cuda")
                calls.append(lambda w=w, out=out, ws=ws, size=size, quant=quant, shared=shared: library.forward_quantized(
                    c_shape, routing, quant, hidden.data_ptr(), logits.data_ptr(), None, w[0].data_ptr(), w[2].data_ptr(),
                    out.data_ptr(), ws.data_ptr(), size, stream(), shared))
            step = lambda: [call() for call in calls]
            step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            us = bench(graph.replay) * 1e3 / len(calls)
            kernels = kernel_times(step, calls=5)
            gate_up = sum(v for k, v in kernels.items() if "gate_up" in k) / len(calls)
            down = sum(v for k, v in kernels.items() if "down" in k) / len(calls)
            ref = reference.setdefault(fmt, outs[0].float())
            diff = ((outs[0].float() - ref).norm() / ref.norm()).item()
            flags = (lib_dir / "flags").read_text() if (lib_dir / "flags").exists() else ""
            print(f"| {lib_dir.name} | {early} | {fmt} | {us:.1f} | {nbytes / us / 1e3:.0f} | {gate_up:.1f} | {down:.1f} | "
                  f"{diff:.1e} | {flags} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("out_dir", type=Path)
    b.add_argument("settings", nargs="+", help="NAME=FLAGS")
    t = sub.add_parser("time")
    t.add_argument("lib_dirs", nargs="+", type=Path)
    t.add_argument("--layers", type=int, default=8, help="weight copies the graph cycles through")
    t.add_argument("--block", type=int, default=32)
    t.add_argument("--programmatic", default="1,0", help="MOE_COMPILE_PROGRAMMATIC_LAUNCH values to time each under")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out_dir, args.settings)
    else:
        time_libraries(args.lib_dirs, args.layers, args.block, args.programmatic.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
