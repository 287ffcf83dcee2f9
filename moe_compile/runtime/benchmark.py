"""`moe-compile bench`: prefill latency, decode tokens/s and peak memory of a build on one backend.

For each batch size and prompt length: random prompt tokens (seeded, no padding), one untimed
warm-up prefill, `repeats` timed prefills (median), then `new_tokens` greedy decode steps from the
last prefill's cache, timed end to end (host argmax and input building included: what a user of
the decode loop gets). Decode tokens/s counts every row of the batch. Peak device memory is the
largest device-wide use seen after each phase (cudaMemGetInfo; ONNX Runtime's arena never shrinks,
so this is its high-water mark plus the CUDA context); peak host memory is the process's max RSS.
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
from .generate import decode_one, prefill


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
          seed: int = 0, on_row=None) -> dict:
    """Run the grid; returns a JSON-ready record (build, backend, machine, versions, rows)."""
    manifest = read_manifest(out)
    if backend not in BACKENDS:
        raise RequestError(f"unknown backend '{backend}'; choose one of {', '.join(sorted(BACKENDS))}")
    batches, prompt_lens = list(batches), list(prompt_lens)
    check_request(manifest, batches, prompt_lens, new_tokens, repeats)
    runner = BACKENDS[backend](out, manifest).activate()
    memory = getattr(runner, "memory", None)
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        for prompt_len in prompt_lens:
            prompts = rng.integers(0, manifest.vocab_size, (batch, prompt_len)).tolist()
            row = _measure(runner, memory, prompts, new_tokens, repeats, manifest.pad_token_id)
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
        "device": memory.name() if memory else "cpu",
        "host": f"{platform.machine()}, {platform.node()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**tool_versions(), **_runtime_versions()},
        "repeats": repeats,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def _measure(backend: Backend, memory, prompts: list[list[int]], new_tokens: int, repeats: int, pad_id: int) -> BenchRow:
    peak = [0]

    def sample() -> None:
        used = memory.used_bytes() if memory else None
        if used is not None:
            peak[0] = max(peak[0], used)

    prefill(backend, prompts, pad_id)  # warm-up: kernels chosen, arena grown
    sample()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, mask = prefill(backend, prompts, pad_id)
        times.append((time.perf_counter() - start) * 1e3)
    sample()
    steps = []
    decode_start = time.perf_counter()
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, mask = decode_one(backend, logits.argmax(-1), mask)
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


def _runtime_versions() -> dict[str, str]:
    from importlib import metadata

    import onnxruntime

    found = {"onnxruntime (imported)": onnxruntime.__version__}
    for package in ("onnxruntime-gpu", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def table(record: dict) -> list[str]:
    lines = [
        f"{record['source']} ({record['family']}, {record['dtype']}, lowering {record['lowering']}) "
        f"on {record['backend']} [{record['device']}]",
        f"{'batch':>5} {'prompt':>6} {'new':>5} {'prefill ms':>11} {'decode tok/s':>13} {'ms/step':>8} "
        f"{'peak dev MB':>12} {'peak host MB':>13}",
    ]
    for r in record["rows"]:
        device = f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] is not None else "-"
        lines.append(
            f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>5} {r['prefill_ms']:>11.1f} "
            f"{r['decode_tokens_per_s']:>13.1f} {r['decode_ms_per_step']:>8.2f} {device:>12} {r['peak_host_mb']:>13.0f}"
        )
    return lines
