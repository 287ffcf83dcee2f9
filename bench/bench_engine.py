"""TensorRT engine build time and size for the benchmark model (issue 4), ahead of time with whichever
TensorRT is installed (tensorrt_rtx on the CPU machines).

    MOE_COMPILE_CACHE=/tmp/mcache python bench/bench_engine.py --out build/bench-engine --json build/bench-engine.json

For each lowering: `moe_compile.build(..., backend="trt")` end to end, the engine stage's own time
(manifest `engine.build_seconds`), the plan's size and its ratio to the weights in the ONNX (all
initializers, counted from their dims and dtype). An engine that held the weights twice would show a
ratio near 2; the target is within 10% of the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

import moe_compile
from moe_compile.export.manifest import read_manifest


def weight_bytes(onnx_path: Path) -> int:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in graph.initializer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-moe-bench")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--lowerings", default="gather,dense,auto", help="comma-separated (default gather,dense,auto)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq", type=int, default=2048)
    parser.add_argument("--out", default="build/bench-engine", help="parent directory of the builds")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rows = []
    for lowering in args.lowerings.split(","):
        out = Path(args.out) / f"{args.dtype}-{lowering}"
        start = time.perf_counter()
        moe_compile.build(args.model, out, dtype=args.dtype, lowering=lowering, max_batch=args.max_batch,
                          max_seq=args.max_seq, backend="trt", progress=False)
        total = time.perf_counter() - start
        engine = read_manifest(out).engine
        weights = weight_bytes(out / "model.onnx")
        rows.append({"lowering": lowering, "build_s": round(total, 1), "engine_s": engine["build_seconds"],
                     "engine_bytes": engine["bytes"], "weight_bytes": weights,
                     "ratio": round(engine["bytes"] / weights, 4)})
        print(json.dumps(rows[-1]), flush=True)

    record = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": platform.machine(), "model": args.model,
        "dtype": args.dtype, "max_batch": args.max_batch, "max_seq": args.max_seq, "rows": rows,
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "onnx", engine["package"].replace("_", "-"))},
    }
    print(f"\n{args.model} {args.dtype}, {engine['package']} {engine['version']}, profiles prefill+decode "
          f"(batch 1..{args.max_batch}, seq 1..{args.max_seq})\n")
    print("| lowering | build s (all stages) | engine s | engine MB | weights MB | engine / weights |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lowering']} | {r['build_s']:.0f} | {r['engine_s']:.0f} | {r['engine_bytes'] / 1e6:.0f} | "
              f"{r['weight_bytes'] / 1e6:.0f} | {r['ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
