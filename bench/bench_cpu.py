"""CPU benchmark, side by side in one run: transformers eager `generate` vs moe-compile's ONNX
Runtime backend with each lowering, on an embedded benchmark model:
- `qwen2-moe-bench` (default; Qwen2-MoE: vocab 32000, hidden 1024, 12 layers, 16/4 heads, 32 experts
  top-4, moe 512, shared 1024, std 0.02);
- `deepseek-v3-bench` (DeepSeek-V3's shape scaled down: vocab 32000, hidden 1024, 8 layers, the first
  dense, latent attention with 16 heads, 64 experts top-6 in 8 groups top-4, moe 256, 1 shared expert).

Reports prefill ms (128-token prompt) and decode tokens/s (64 greedy tokens) at batch 1 and 4,
median of 3, and the batch-1 decode floor: measured read bandwidth / bytes of weights a decode
step must read (attention, shared expert, top-k routed experts, router, lm_head per token).

    python bench/bench_cpu.py [--model qwen2-moe-bench] [--lowerings ort,auto,gather] [--out build/bench] [--json results.json]
                              [--builds LABEL=DIR,...]

`--builds` adds existing builds of the same model as rows (not rebuilt): e.g. one made by another
commit, to compare two versions of a lowering side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import moe_compile
from moe_compile.export.manifest import tool_versions
from moe_compile.models.loading import load_model, resolve_checkpoint
from moe_compile.runtime.generate import prefill

MODELS = ("qwen2-moe-bench", "deepseek-v3-bench")
PROMPT_LEN, NEW_TOKENS, REPEATS = 128, 64, 3


def read_bandwidth_gbs() -> float:
    data = np.ones(256 * 2**20, dtype=np.float32)  # 1 GiB, far beyond the caches
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / min(times) / 1e9


def active_weight_bytes(model) -> int:
    """Bytes a batch-1 decode step must read: everything except the unselected routed experts
    and the embedding table (one row is read)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [experts, ...]
            total += p.nbytes * model.config.num_experts_per_tok // p.shape[0]
        else:
            total += p.nbytes
    return total


def prompts(batch: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(10, 30000, PROMPT_LEN).tolist() for _ in range(batch)]


def bench_transformers(model, batch: int) -> tuple[float, float]:
    ids = torch.tensor(prompts(batch))
    prefill_ms, decode = [], []
    with torch.no_grad():
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(ids)
            prefill_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            total = time.perf_counter() - start
            decode.append(batch * (NEW_TOKENS - 1) / max(total - prefill_ms[-1] / 1e3, 1e-9))
    return statistics.median(prefill_ms), statistics.median(decode)


def bench_ours(compiled, batch: int) -> tuple[float, float]:
    prefill_ms, decode = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        prefill(compiled.backend, prompts(batch), compiled.manifest.pad_token_id)
        prefill_ms.append((time.perf_counter() - start) * 1e3)
        compiled.generate(prompts(batch), max_new_tokens=NEW_TOKENS, eos_token_id=[])
        decode.append(compiled.last_stats.decode_tokens_per_s)
    return statistics.median(prefill_ms), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--lowerings", default="ort,auto,gather", help="portable-form lowerings; 'ort' = the ort form")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--out", default="build/bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--builds", default="", help="LABEL=DIR,... existing builds to add as rows")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(torch.get_num_threads())

    reference = load_model(resolve_checkpoint(args.model))
    bandwidth = read_bandwidth_gbs()
    active = active_weight_bytes(reference)
    print(f"\n{args.model}: {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s, active weights {active / 1e6:.0f} MB")
    print(f"versions: {tool_versions()}")
    header = "| implementation | build s | " + " | ".join(f"b{b} prefill ms | b{b} decode tok/s" for b in batches) + " |"
    print(header + "\n|" + "---|" * (2 + 2 * len(batches)), flush=True)
    rows = []

    def row(name: str, build_s: float | None, results: dict) -> None:
        """Print each row as soon as it is measured: a later failure (disk, memory) keeps the earlier ones."""
        rows.append((name, build_s, results))
        cells = []
        for b in batches:
            pre, dec = results.get(b, (None, None))
            cells += [f"{pre:.0f}" if pre else "", f"{dec:.1f}" if dec else ""]
        print(f"| {name} | {build_s:.0f} |" if build_s else f"| {name} | |", " | ".join(cells), "|", flush=True)

    row("floor (read bandwidth / active fp32 weights)", None, {1: (None, bandwidth * 1e9 / active)})
    row("transformers eager", None, {b: bench_transformers(reference, b) for b in batches})
    del reference
    for lowering in filter(None, args.lowerings.split(",")):
        out = Path(args.out) / lowering
        start = time.perf_counter()
        choice = dict(form="ort") if lowering == "ort" else dict(form="portable", lowering=lowering)
        moe_compile.build(args.model, out, max_batch=max(batches), max_seq=PROMPT_LEN + NEW_TOKENS, backend="onnx", **choice)
        build_s = time.perf_counter() - start
        compiled = moe_compile.load(out)
        name = "ort form" if lowering == "ort" else f"portable, {lowering}"
        row(f"moe-compile ORT CPU, {name}", build_s, {b: bench_ours(compiled, b) for b in batches})
        del compiled
    for label, build_dir in (item.split("=", 1) for item in filter(None, args.builds.split(","))):
        compiled = moe_compile.load(build_dir)
        row(f"moe-compile ORT CPU, {label}", None, {b: bench_ours(compiled, b) for b in batches})
        del compiled
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bandwidth, "active_bytes": active, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
