"""Sweep of the dense quantized matmul's launch settings (csrc/quant_matmul.cu): µs a call at A2.7B's projection
shapes (K = 2048; q/k/v 6144, o 2048 and LM head 151936 rows), int4 and int8, block 32, for each setting.

    python bench/sweep_quant_matmul.py build DIR   # here (nvcc): one small library per setting, sm_90
    python bench/sweep_quant_matmul.py time DIR    # on the GPU: CUDA-graph replays over copies of the weights

A setting is (KSPLIT warps a row group, warps a block, loads a round). `build` compiles quant_matmul.cu alone with
its dispatch replaced by the setting (the shipped file is not touched); `time` loads each library through ctypes
and calls moe_compile_quantized_matmul on random codes, each call on the next of enough copies of the weights that
L2 holds none of them (as a decode step finds a layer's), and prints the settings from fastest to slowest with
their output's relative difference to the first setting's. docs/FUSED_MOE.md's table came from this.
"""

import argparse
import ctypes
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "moe_compile" / "plugins" / "csrc"
SETTINGS = [(8, 8, 2), (4, 8, 2), (4, 4, 2), (2, 8, 2), (2, 4, 4), (1, 4, 4), (4, 8, 4), (2, 8, 4), (1, 8, 4),
            (8, 8, 1), (1, 8, 8), (2, 4, 2)]
K, BLOCK = 2048, 32


def build(out: Path) -> None:
    text = (SOURCE / "quant_matmul.cu").read_text()
    start = text.index("template <typename T, int BITS>\nvoid launch_quant_matmul_as(")
    end = text.index("template <typename T>\nvoid launch_quant_matmul_bits(")
    out.mkdir(parents=True, exist_ok=True)

    def one(setting):
        split, warps, rounds = setting
        body = text[start:end].split("{", 1)[0] + "{\n" + (
            f"  launch_quant_matmul_split<T, BITS, {split}, {warps}>(x, codes, scales, bias, y, M, K, N, block, s);\n}}\n\n")
        variant = text[:start] + body + text[end:]
        variant = variant.replace("constexpr int kRound = 2;", f"constexpr int kRound = {rounds};")
        name = out / f"qm_s{split}_w{warps}_u{rounds}"
        name.with_suffix(".cu").write_text(variant)
        subprocess.run(["nvcc", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_90", "-Xcompiler", "-fPIC",
                        "-shared", f"-I{SOURCE}", str(name.with_suffix(".cu")), "-o", str(name.with_suffix(".so"))],
                       check=True)

    with ThreadPoolExecutor() as pool:
        list(pool.map(one, SETTINGS))


def time_all(out: Path) -> None:
    import torch
    from bench_fused_moe import graph_us  # this folder's: CUDA-graph replays, the median

    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    libs = {}
    for path in sorted(out.glob("qm_*.so")):
        lib = ctypes.CDLL(str(path))
        lib.moe_compile_quantized_matmul.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i32, i32, i32, vp]
        libs[path.stem[3:]] = lib
    for bits in (4, 8):
        for name, n in (("qkv", 6144), ("o", 2048), ("lm_head", 151936)):
            nbytes = n * K * bits // 8 + n * K // BLOCK * 2
            copies = max(1, min(32, -(-256 * 2**20 // nbytes)))
            weights = [(torch.randint(0, 256, (n, K * bits // 8), dtype=torch.uint8, device="cuda"),
                        (torch.rand(n, K // BLOCK, device="cuda") / 100).half()) for _ in range(copies)]
            bias = torch.randn(n, device="cuda").half()
            for t in (1, 16):
                x = torch.randn(t, K, device="cuda").half()
                y = torch.empty(t, n, device="cuda").half()
                row, ref = [], None
                for key, lib in libs.items():
                    turn = iter(range(10**9))

                    def fn(lib=lib):
                        codes, scales = weights[next(turn) % copies]
                        lib.moe_compile_quantized_matmul(x.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                                                         bias.data_ptr(), y.data_ptr(), t, K, n, bits, BLOCK, 1,
                                                         torch.cuda.current_stream().cuda_stream)

                    fn()
                    torch.cuda.synchronize()
                    got = y.float().clone()
                    ref = got if ref is None else ref
                    row.append((graph_us(fn, calls=max(20, copies)), key, ((got - ref).norm() / ref.norm()).item()))
                print(f"int{bits} {name:8s} T={t:2d} {nbytes / 1e6:7.1f} MB | " + " | ".join(
                    f"{key} {us:.1f}" + ("" if diff < 1e-3 else f" DIFF {diff:.0e}") for us, key, diff in sorted(row)),
                    flush=True)
            del weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "time"))
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    build(args.dir) if args.step == "build" else time_all(args.dir)


if __name__ == "__main__":
    main()
