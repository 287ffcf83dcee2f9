"""Per-kernel CUDA time of an ort-form build's batch-1 decode steps on ort-cuda (CUPTI, through
torch.profiler, which sees ONNX Runtime's kernels): wall ms per step over 50 steps, then over 20 steps
GPU us per step by kernel, and the step's critical path by kernel. Where a step's wall time goes: the graph
on the GPU (first kernel to last), one launch of the step's graph waited for alone (runtime/cuda_step.py: the
graph, its copies and the host's launch and wait), and the decode loop as it runs (greedy steps launched one
ahead, so the host's work hides behind the GPU's).

A kernel's own time overlaps its neighbours' where it starts early (programmatic launches), so those times do
not add up to the step. The critical path does: kernels in start order, each is charged the time by which its
end moves the latest end so far (the whole of it after an idle gap, which is charged to "idle"). In a chain
of dependent launches that is the latency each kernel adds to the step. One step's kernels follow, in order.

    python bench/ort_step_kernels.py BUILD on|off        # on: CUDA graphs (GPU machine, onnxruntime-gpu)

The file name must not be kernels.py: transformers imports a package of that name."""

import collections
import json
import statistics
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
    run_ms = launch_ms(backend, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            token, mask = decode_one(backend, token, mask, chooser)
        torch.cuda.synchronize()
    time_us, count = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            time_us[event.name[:90]] += event.device_time_total
            count[event.name[:90]] += 1
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:90]) for e in prof.events()
                     if e.device_type.name == "CUDA")
    steps_seen = split_steps(kernels)
    per_step = len(steps_seen[-1])
    graph_ms = statistics.mean(graph_span(step) for step in steps_seen) / 1e3
    print(json.dumps({"graph": graph, "wall_ms_per_step": wall_ms, "launch_ms_per_step": run_ms, "graph_ms_per_step": graph_ms,
                      "gpu_us_per_step": sum(time_us.values()) / PROFILED, "kernels_per_step": per_step}))
    print(f"a step's wall {wall_ms:.3f} ms in the decode loop; the graph on the GPU {graph_ms:.3f}; one launch waited "
          f"for alone {run_ms:.3f} (the graph, its copies, the host's launch and wait)")
    for name, us in time_us.most_common(30):
        print(f"{us / PROFILED:9.1f} us/step {count[name] / PROFILED:6.1f}/step  {name}")
    added, idle = critical_path(kernels)
    span = kernels[-1][1] - kernels[0][0]
    print(f"\ncritical path: {span / PROFILED:.1f} us a step, of which idle {idle / PROFILED:.1f}")
    for name, us in added.most_common(30):
        print(f"{us / PROFILED:9.1f} us/step {100 * us / span:5.1f}%  {name}")
    one = steps_seen[-1]
    print(f"\nthe last step's {per_step} kernels: start, end and the critical path's gain, us from its first start")
    frontier, t0 = one[0][0], one[0][0]
    for start, end, name in one:
        print(f"{start - t0:8.1f} {end - t0:8.1f} {max(0.0, end - max(frontier, start)):6.1f}  {name[:70]}")
        frontier = max(frontier, end)


def launch_ms(backend, steps: int) -> float:
    """ms one launch of the batch-1 decode graph takes when the host waits for it before the next (no step
    launched ahead): the graph with its copies, and the host's launch and wait."""
    if not backend.cuda_graph:
        return float("nan")
    backend._settle()
    step = backend.decodes[1].step
    start = time.perf_counter()
    for _ in range(steps):  # the argmax fed back, the cache slot of the last step written again
        step.tokens(step.launch(None, step.mask_lengths))
    return (time.perf_counter() - start) / steps * 1e3


def split_steps(kernels: list[tuple[float, float, str]]) -> list[list[tuple[float, float, str]]]:
    """The profiled kernels cut into decode steps: each step ends with the token's copy to the host."""
    steps, current = [], []
    for kernel in kernels:
        current.append(kernel)
        if kernel[2].startswith("Memcpy DtoH"):
            steps.append(current)
            current = []
    return steps


def graph_span(step: list[tuple[float, float, str]]) -> float:
    """µs from a step's first kernel to its last, the copies of inputs and of the token left out."""
    inside = [(start, end) for start, end, name in step if not name.startswith("Memcpy")]
    return max(end for _, end in inside) - min(start for start, _ in inside)


def critical_path(kernels: list[tuple[float, float, str]]) -> tuple[collections.Counter, float]:
    """µs each kernel name adds to the latest end so far, kernels in start order; and the idle gaps' sum."""
    added, idle, frontier = collections.Counter(), 0.0, kernels[0][0]
    for start, end, name in kernels:
        idle += max(0.0, start - frontier)
        added[name] += max(0.0, end - max(frontier, start))
        frontier = max(frontier, end)
    return added, idle


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "on")
