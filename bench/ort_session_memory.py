"""Host memory of one ONNX Runtime CPU session on a build, with graph optimisations on or off: peak RSS
after loading and after one decoder step (batch 2 x 4 new tokens, 3 past), as the build's check runs it.

    python bench/ort_session_memory.py OUT all|none      # one setting per process: max RSS is per process
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import onnxruntime as ort

from moe_compile.capture.trace import sample_inputs
from moe_compile.export.manifest import ONNX_FILE, read_manifest
from moe_compile.models.loading import DTYPES

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(out: str, level: str) -> None:
    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    start = time.perf_counter()
    session = ort.InferenceSession(str(out_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    after_load = peak_gb()
    shapes = [tuple(map(tuple, layer)) for layer in manifest.kv["layers"]]
    args = sample_inputs(shapes, DTYPES[manifest.dtype], 2, 4, 3, manifest.vocab_size)
    session.run(["logits"], {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    print(f"optimisations {level}: load + run {time.perf_counter() - start:.1f} s, peak RSS after load "
          f"{after_load:.2f} GB, after the step {peak_gb():.2f} GB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
