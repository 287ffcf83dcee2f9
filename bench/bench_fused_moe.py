"""Benchmark the fused MoE kernels against transformers' experts implementations on one GPU.

    PYTHONUNBUFFERED=1 python bench/bench_fused_moe.py [--tokens 1,8,64,512,2048] [--json out.json]

For each model shape (model_shapes.SHAPES) and token count: median time (triton do_bench, L2
flushed before every repetition), weight bytes of the selected experts over time (GB/s) and
expert FLOPs over time (TFLOP/s), next to the ceilings measured in the same run: a device-to-device
copy (bytes read + written) and an 8192^3 bf16 matmul. Compared: transformers' `batched_mm` and
`grouped_mm` experts forwards (integrations/moe.py) on a Qwen2MoeExperts module holding the same
weights, with torch routing (softmax -> top-k -> renorm) in front, as the model runs it; ours takes
the router logits and routes inside.
"""

import argparse
import json
import sys

import torch
import triton.testing

from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
from moe_compile.plugins.torch_ops import fused_moe

BATCHED_MM_GATHER_LIMIT = 16e9  # batched_mm copies each token's expert weights: skip beyond this


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6  # GB/s


def matmul_rate() -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def transformers_experts(shape, routing, gate_up, down):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = Qwen2MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                            num_experts=shape.num_experts, num_experts_per_tok=routing.top_k)
    with torch.device("meta"):
        experts = Qwen2MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)

    def run(impl, hidden, logits):
        experts.config._experts_implementation = impl
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, routing.top_k, dim=-1)
        if routing.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return experts(hidden, ids, weights.to(hidden.dtype))

    return run


def bench_shape(name, tokens, rows, ours_only=False):
    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda", generator=gen)
               / shape.hidden**0.5).bfloat16()
    down = (torch.randn(shape.num_experts, shape.hidden, shape.intermediate, device="cuda", generator=gen)
            / shape.intermediate**0.5).bfloat16()
    theirs = transformers_experts(shape, routing, gate_up, down)
    expert_bytes = 3 * shape.hidden * shape.intermediate * 2
    for t in tokens:
        hidden = torch.randn(t, shape.hidden, device="cuda", generator=gen).bfloat16()
        logits = torch.randn(t, shape.num_experts, device="cuda", generator=gen).bfloat16()
        ids = torch.topk(logits.float(), routing.top_k, dim=-1).indices
        weight_bytes = torch.unique(ids).numel() * expert_bytes
        flops = 2 * t * routing.top_k * 3 * shape.hidden * shape.intermediate
        row = {"shape": name, "T": t, "weight_bytes": weight_bytes, "flops": flops}
        row["ours_ms"] = bench(lambda: fused_moe(hidden, logits, gate_up, down, routing))
        if ours_only:
            print(f"| {name:18s} | {t:5d} | {row['ours_ms'] * 1e3:9.1f} | {weight_bytes / row['ours_ms'] / 1e6:7.0f} |")
            continue
        if t * routing.top_k * expert_bytes <= BATCHED_MM_GATHER_LIMIT:
            row["batched_mm_ms"] = bench(lambda: theirs("batched_mm", hidden, logits))
        row["grouped_mm_ms"] = bench(lambda: theirs("grouped_mm", hidden, logits))
        rows.append(row)
        print_row(row)
    del gate_up, down
    torch.cuda.empty_cache()


def kernel_breakdown(name, t):
    """Per-kernel device time of our op (torch profiler, 20 calls): where the microseconds go."""
    from torch.profiler import ProfilerActivity, profile

    shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gate_up = torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda").bfloat16()
    down = torch.randn(shape.num_experts, shape.hidden, shape.intermediate, device="cuda").bfloat16()
    hidden = torch.randn(t, shape.hidden, device="cuda").bfloat16()
    logits = torch.randn(t, shape.num_experts, device="cuda").bfloat16()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fused_moe(hidden, logits, gate_up, down, routing)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            flush.zero_()  # weights come from HBM, as in the timed runs
            fused_moe(hidden, logits, gate_up, down, routing)
        torch.cuda.synchronize()
    print(f"kernel breakdown {name} T={t} (µs per call):")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if "zero" not in ev.key and "fill" not in ev.key.lower():
            print(f"  {ev.device_time_total / 20:8.1f}  {ev.key[:100]}")


def print_row(r):
    ms = r["ours_ms"]
    others = {k: r[k] for k in ("batched_mm_ms", "grouped_mm_ms") if k in r}
    best_other = min(others.values())
    fmt = lambda k: f"{r[k] * 1e3:9.1f}" if k in r else "     skip"
    print(f"| {r['shape']:18s} | {r['T']:5d} | {ms * 1e3:9.1f} | {r['weight_bytes'] / ms / 1e6:7.0f} | "
          f"{r['flops'] / ms / 1e9:7.1f} | {fmt('batched_mm_ms')} | {fmt('grouped_mm_ms')} | "
          f"{best_other / ms:6.2f}x |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,64,512,2048")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="also write the rows and ceilings here")
    parser.add_argument("--ours-only", action="store_true", help="time only the fused kernels")
    parser.add_argument("--breakdown", default="", help="shape:T pairs to profile per kernel, e.g. qwen1.5-moe-a2.7b:1")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    import transformers

    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__}"
          f" | triton {triton.__version__}")
    print(f"ceilings: copy {bandwidth:.0f} GB/s (read+write), bf16 matmul 8192^3 {rate:.0f} TFLOP/s")
    print("| shape              |     T |  ours µs |    GB/s | TFLOP/s | batched_mm µs | grouped_mm µs | vs best |")
    rows = []
    for name in args.shapes.split(","):
        bench_shape(name, [int(t) for t in args.tokens.split(",")], rows, args.ours_only)
    if args.ours_only:
        return 0
    a27 = {r["T"]: r for r in rows if r["shape"] == "qwen1.5-moe-a2.7b"}
    if 1 in a27:
        r = a27[1]
        print(f"target T=1 A2.7B: {r['weight_bytes'] / r['ours_ms'] / 1e6 / bandwidth:.0%} of copy bandwidth (>= 75%)")
    for r in rows:
        if r["T"] == 2048:
            print(f"target T=2048 {r['shape']}: {r['flops'] / r['ours_ms'] / 1e9 / rate:.0%} of bf16 matmul (>= 50%)")
    for pair in filter(None, args.breakdown.split(",")):
        name, t = pair.split(":")
        kernel_breakdown(name, int(t))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": bandwidth, "matmul_TFLOPs": rate, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
