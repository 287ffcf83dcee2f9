"""Issue 12's CPU benchmark in one command: the benchmark Qwen2-MoE (`qwen2-moe-bench`) built by moe-compile in fp32,
int8 and int4 (ort form), side by side with llama.cpp's f32, q8_0, q4_0 and q4_K_M files of the same model, in
alternating passes, with the issue's three targets judged pass by pass:

    int8 decode >= llama.cpp q8_0;  int4 decode >= llama.cpp q4_0;  quantized prefill no slower than our fp32

Each pass benches every build of ours (`moe-compile bench`: batch 1, 128-token prompt, 64 greedy tokens, median of
3 prefills; in reverse order on even passes), then llama.cpp (`llama-bench`: prefill `-p 128 -n 0`, decode
`-p 0 -n 64 -d 128`, `-r 3`, THREADS threads). These machines are noisy: only rows of one pass compare.

    python bench/cpu_vs_llamacpp.py [--passes 3] [--builds fp32,int8-head,int4-head,int8,int4] [--work DIR]

llama.cpp and its GGUF files come from ../shared/peers/run_all.sh (--peers: its WORK folder, default /tmp/peers:
llbuild/bin/llama-bench and gguf/qwen2moe-{f32,q8_0,q4_0,q4_K_M}.gguf, made from the same random weights).
Builds are made once under --work and reused; every raw result goes to --work/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

MODEL = "qwen2-moe-bench"
BUILD_FLAGS = {  # our builds: name -> moe-compile build flags beyond the ort form
    "fp32": [],
    "int8": ["--quantize", "int8"],
    "int4": ["--quantize", "int4"],
    "int8-head": ["--quantize", "int8", "--quantize-lm-head"],
    "int4-head": ["--quantize", "int4", "--quantize-lm-head"],
}
GGUF = ("f32", "q8_0", "q4_0", "q4_K_M")
TARGETS = (("int8", "q8_0"), ("int4", "q4_0"))  # our width against llama.cpp's


def run(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout


def build(name: str, work: Path) -> Path:
    out = work / name
    if not (out / "manifest.json").exists():
        print(f"building {name} ...", flush=True)
        run([sys.executable, "-m", "moe_compile.cli", "build", MODEL, "-o", str(out), "--form", "ort",
             "--max-seq", "512", *BUILD_FLAGS[name]], env={**os.environ, "MOE_COMPILE_CACHE": str(work / "cache")})
    return out


def bench_ours(out: Path) -> dict:
    record = json.loads(run([sys.executable, "-m", "moe_compile.cli", "bench", str(out), "--batch", "1", "--prompt-len",
                             "128", "--new-tokens", "64", "--repeats", "3", "--json"]))
    row = record["rows"][0]
    return {"prefill_ms": row["prefill_ms"], "decode_tok_s": row["decode_tokens_per_s"]}


def bench_llamacpp(peers: Path, threads: int) -> dict[str, dict]:
    files = [str(peers / "gguf" / f"qwen2moe-{t}.gguf") for t in GGUF]
    models = [arg for f in files for arg in ("-m", f)]
    results: dict[str, dict] = {t: {} for t in GGUF}
    for extra, key in ((["-p", "128", "-n", "0"], "prefill"), (["-p", "0", "-n", "64", "-d", "128"], "decode")):
        out = run([str(peers / "llbuild" / "bin" / "llama-bench"), *models, *extra, "-t", str(threads), "-r", "3",
                   "-o", "jsonl"])
        for line in out.splitlines():
            r = json.loads(line)
            kind = next(t for t in GGUF if r["model_filename"].endswith(f"-{t}.gguf"))
            if key == "prefill":
                results[kind]["prefill_ms"] = 128e3 / r["avg_ts"]  # ms for the 128-token prompt
            else:
                results[kind]["decode_tok_s"] = r["avg_ts"]
    return results


def cpu() -> str:
    """The CPU's name and the vector extensions that decide the verdicts (ONNX Runtime's int8 kernels: VNNI)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name} ({' '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni') if f in flags) or 'no AVX2'})"


def verdicts(ours: dict[str, dict], theirs: dict[str, dict]) -> list[str]:
    lines = []
    for width, peer in TARGETS:
        for name in (f"{width}-head", width):
            if name in ours:
                ratio = ours[name]["decode_tok_s"] / theirs[peer]["decode_tok_s"]
                lines.append(f"{name} decode / llama.cpp {peer}: {ratio:.3f}x ({'holds' if ratio >= 1 else 'missed'})")
    if "fp32" in ours:
        for name, r in ours.items():
            if name != "fp32":
                ratio = r["prefill_ms"] / ours["fp32"]["prefill_ms"]
                lines.append(f"{name} prefill / our fp32: {ratio:.3f}x ({'holds' if ratio <= 1 else 'missed'})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--builds", default="fp32,int8-head,int4-head,int8,int4")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpu-vs-llamacpp"))
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS", "/tmp/peers")))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    names = args.builds.split(",")
    unknown = [n for n in names if n not in BUILD_FLAGS]
    if unknown:
        parser.error(f"unknown build {', '.join(unknown)}; choose from {', '.join(BUILD_FLAGS)}")
    needed = [args.peers / "llbuild/bin/llama-bench", *(args.peers / f"gguf/qwen2moe-{t}.gguf" for t in GGUF)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        parser.error(f"{missing[0]} is missing: run bash ../shared/peers/run_all.sh (WORK={args.peers}) first")
    args.work.mkdir(parents=True, exist_ok=True)
    outs = {name: build(name, args.work) for name in names}
    print(f"{cpu()}, {os.cpu_count()} CPUs; {args.threads} llama.cpp threads", flush=True)
    with open(args.work / "results.jsonl", "a") as log:
        for p in range(1, args.passes + 1):
            order = names if p % 2 else names[::-1]
            ours = {name: bench_ours(outs[name]) for name in order}
            theirs = bench_llamacpp(args.peers, args.threads)
            log.write(json.dumps({"pass": p, "ours": ours, "llama.cpp": theirs}) + "\n")
            print(f"\npass {p} (ours in the order {', '.join(order)}, then llama.cpp)")
            print(f"{'':>18} {'prefill ms':>11} {'decode tok/s':>13}")
            for label, r in [*((f"ours {n}", ours[n]) for n in names), *((f"llama.cpp {t}", theirs[t]) for t in GGUF)]:
                print(f"{label:>18} {r['prefill_ms']:>11.1f} {r['decode_tok_s']:>13.1f}")
            for line in verdicts(ours, theirs):
                print("  " + line)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
