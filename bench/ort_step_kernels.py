"""Per-kernel CUDA time of an ort-form build's batch-1 decode steps on ort-cuda (CUPTI, through
torch.profiler, which sees ONNX Runtime's kernels): wall ms per step over 50 steps, then over 20 steps
GPU us per step by kernel.

    python bench/ort_step_kernels.py BUILD on|off        # on: CUDA graphs (GPU machine, onnxruntime-gpu)

The file name must not be kernels.py: transformers imports a package of that name."""

import collections
import json
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import moe_compile
from moe_compile.runtime.generate import decode_one, prefill
from moe_compile.runtime.sampling import Chooser

PROFILED = 20


def main(out: str, graph: bool) -> None:
    backend, chooser = moe_compile.load(out, "ort-cuda", cuda_graph=graph).backend, Chooser()
    prompt = [list(np.random.default_rng(0).integers(10, 30000, 128))]
    token, mask = prefill(backend, prompt, 0, chooser)
    for _ in range(5):  # past the uncaptured warm-up runs and the capture
        token, mask = decode_one(backend, token, mask, chooser)
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 50
    for _ in range(steps):
        token, mask = decode_one(backend, token, mask, chooser)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            token, mask = decode_one(backend, token, mask, chooser)
        torch.cuda.synchronize()
    time_us, count = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            time_us[event.name[:90]] += event.device_time_total
            count[event.name[:90]] += 1
    print(json.dumps({"graph": graph, "wall_ms_per_step": wall_ms, "gpu_us_per_step": sum(time_us.values()) / PROFILED,
                      "kernels_per_step": sum(count.values()) / PROFILED}))
    for name, us in time_us.most_common(30):
        print(f"{us / PROFILED:9.1f} us/step {count[name] / PROFILED:6.1f}/step  {name}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "on")
