"""`moe-compile bench`: prefill latency, decode tokens/s and peak memory of a build on one backend.

For each batch size and prompt length: random prompt tokens (seeded, no padding), one untimed
warm-up prefill and `WARM_STEPS` decode steps (kernels chosen, arena grown, CUDA graphs captured),
`repeats` timed prefills (median), then `new_tokens` greedy decode steps from the last prefill's
cache, timed end to end (the greedy choice as the decode loop makes it, and input building included:
what a user of the decode loop gets; on an ort-form build only token ids cross to the host). Decode
tokens/s counts every row of the batch. Peak device memory is the largest device-wide use seen after
each phase (cudaMemGetInfo; ONNX Runtime's arena never shrinks, so this is its high-water mark plus
the CUDA context); peak host memory is the process's max RSS.

Each row also gets its decode floor (runtime/floor.py): the mean bytes a decode step of that row must
read (weights, the selected experts, the KV cache at the row's mean length) over the copy bandwidth
measured on the backend's device in the same run, and our share of it (decode tokens/s ÷ floor tokens/s).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import resource
import statistics
import time

import numpy as np

from ..errors import RequestError
from ..export.manifest import read_manifest, tool_versions
from .backend import BACKENDS, Backend
from .floor import StepBytes, copy_bandwidth, step_bytes
from .generate import decode_one, prefill
from .sampling import Chooser

WARM_STEPS = 3  # ONNX Runtime captures a CUDA graph after two warm-up runs


@dataclasses.dataclass
class BenchRow:
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float  # median of the timed repeats
    prefill_ms_all: list[float]
    decode_tokens_per_s: float  # all rows together
    decode_ms_per_step: float  # median step
    kv_length: int  # tokens in the cache at the end: prompt_len + new_tokens
    peak_device_mb: float | None
    peak_host_mb: float
    floor_bytes: float | None = None  # mean bytes a decode step of this row must read
    floor_ms: float | None = None  # floor_bytes / measured copy bandwidth
    floor_tokens_per_s: float | None = None  # batch / floor_ms
    percent_of_floor: float | None = None  # decode_tokens_per_s / floor_tokens_per_s, in %


def check_request(manifest, batches: list[int], prompt_lens: list[int], new_tokens: int, repeats: int) -> None:
    if not batches or not prompt_lens:
        raise RequestError("give at least one batch size and one prompt length")
    if min(batches) < 1 or min(prompt_lens) < 1 or new_tokens < 1 or repeats < 1:
        raise RequestError("batch sizes, prompt lengths, --new-tokens and --repeats must all be >= 1")
    if max(batches) > manifest.max_batch:
        raise RequestError(f"batch {max(batches)} is over this build's max_batch {manifest.max_batch} (--max-batch)")
    if max(prompt_lens) + new_tokens > manifest.max_seq:
        raise RequestError(
            f"prompt {max(prompt_lens)} + {new_tokens} new tokens exceeds this build's max_seq {manifest.max_seq} (--max-seq)"
        )


def bench(out, backend: str = "ort", batches=(1,), prompt_lens=(128,), new_tokens: int = 128, repeats: int = 3,
          seed: int = 0, on_row=None, cuda_graph: bool = True) -> dict:
    """Run the grid; returns a JSON-ready record (build, backend, machine, versions, rows)."""
    manifest = read_manifest(out)
    if backend not in BACKENDS:
        raise RequestError(f"unknown backend '{backend}'; choose one of {', '.join(sorted(BACKENDS))}")
    batches, prompt_lens = list(batches), list(prompt_lens)
    check_request(manifest, batches, prompt_lens, new_tokens, repeats)
    runner = BACKENDS[backend](out, manifest, cuda_graph=cuda_graph).activate()
    memory = getattr(runner, "memory", None)
    device = getattr(runner, "device", "cuda")  # TensorRT's backend has no CPU form
    reads = step_bytes(out, manifest)
    bandwidth = copy_bandwidth(device)
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        for prompt_len in prompt_lens:
            prompts = rng.integers(0, manifest.vocab_size, (batch, prompt_len)).tolist()
            row = _with_floor(_measure(runner, memory, prompts, new_tokens, repeats, manifest.pad_token_id), reads, bandwidth)
            rows.append(row)
            if on_row:
                on_row(row)
    return {
        "build": str(out),
        "source": manifest.source,
        "family": manifest.family.get("model_type"),
        "dtype": manifest.dtype,
        "lowering": manifest.lowering,
        "backend": backend,
        "moe_kernels": getattr(runner, "moe_kernels", None),  # ort-cuda: moe_compile's or onnxruntime's (ort_kernels.py)
        "device": memory.name() if memory else "cpu",
        "host": f"{platform.machine()}, {platform.node()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**tool_versions(), **_runtime_versions()},
        "repeats": repeats,
        "copy_bandwidth_GBps": bandwidth / 1e9,  # bytes read + written per second (runtime/floor.py)
        "floor_bytes_b1": reads.total(1, 0),  # weights a batch-1 step must read, before the KV cache
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def _measure(backend: Backend, memory, prompts: list[list[int]], new_tokens: int, repeats: int, pad_id: int) -> BenchRow:
    peak = [0]

    def sample() -> None:
        used = memory.used_bytes() if memory else None
        if used is not None:
            peak[0] = max(peak[0], used)

    greedy = Chooser()
    tokens, mask = prefill(backend, prompts, pad_id, greedy)  # warm-up
    for _ in range(min(WARM_STEPS, backend.manifest.max_seq - backend.length)):
        tokens, mask = decode_one(backend, tokens, mask, greedy)
    sample()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, mask = prefill(backend, prompts, pad_id, greedy)
        times.append((time.perf_counter() - start) * 1e3)
    sample()
    steps = []
    decode_start = time.perf_counter()
    for _ in range(new_tokens):
        start = time.perf_counter()
        tokens, mask = decode_one(backend, tokens, mask, greedy)
        steps.append(time.perf_counter() - start)
    decode_s = time.perf_counter() - decode_start
    sample()
    batch = len(prompts)
    return BenchRow(
        batch=batch,
        prompt_len=len(prompts[0]),
        new_tokens=new_tokens,
        prefill_ms=statistics.median(times),
        prefill_ms_all=times,
        decode_tokens_per_s=batch * new_tokens / decode_s,
        decode_ms_per_step=statistics.median(steps) * 1e3,
        kv_length=backend.length,
        peak_device_mb=peak[0] / 2**20 if memory and memory.used_bytes() is not None else None,
        peak_host_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _with_floor(row: BenchRow, reads: StepBytes, bandwidth: float) -> BenchRow:
    """The row's floor: a decode step reads the cache at past lengths prompt_len .. prompt_len + new_tokens - 1
    (linear in the length, so their mean is the floor at the mean length)."""
    row.floor_bytes = reads.total(row.batch, row.prompt_len + (row.new_tokens - 1) / 2)
    row.floor_ms = row.floor_bytes / bandwidth * 1e3
    row.floor_tokens_per_s = row.batch / row.floor_ms * 1e3
    row.percent_of_floor = 100 * row.decode_tokens_per_s / row.floor_tokens_per_s
    return row


def _runtime_versions() -> dict[str, str]:
    from importlib import metadata

    from .ort_install import import_onnxruntime

    found = {"onnxruntime (imported)": import_onnxruntime().__version__}
    for package in ("onnxruntime-gpu", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def table(record: dict) -> list[str]:
    lines = [
        f"{record['source']} ({record['family']}, {record['dtype']}, lowering {record['lowering']}) "
        f"on {record['backend']} [{record['device']}]"
        + (f", MoE nodes on {record['moe_kernels']}'s kernels" if record.get("moe_kernels") else ""),
    ]
    if record.get("copy_bandwidth_GBps"):
        lines.append(f"floor: a batch-1 step reads {record['floor_bytes_b1'] / 1e9:.3g} GB of weights (+ the KV cache); "
                     f"copy bandwidth {record['copy_bandwidth_GBps']:.0f} GB/s (read + written)")
    lines.append(f"{'batch':>5} {'prompt':>6} {'new':>5} {'prefill ms':>11} {'decode tok/s':>13} {'ms/step':>8} "
                 f"{'floor ms':>9} {'floor tok/s':>12} {'% floor':>8} {'peak dev MB':>12} {'peak host MB':>13}")
    for r in record["rows"]:
        device = f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] is not None else "-"
        floor = (f"{r['floor_ms']:>9.3f} {r['floor_tokens_per_s']:>12.1f} {r['percent_of_floor']:>7.1f}%"
                 if r.get("floor_ms") is not None else f"{'-':>9} {'-':>12} {'-':>8}")
        lines.append(
            f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>5} {r['prefill_ms']:>11.1f} "
            f"{r['decode_tokens_per_s']:>13.1f} {r['decode_ms_per_step']:>8.2f} {floor} {device:>12} {r['peak_host_mb']:>13.0f}"
        )
    return lines
