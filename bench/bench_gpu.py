"""GPU end-to-end pieces for issue 6, run by bench/gpu_e2e.sh on the H100 (each a subcommand):

    checkpoint DIR [--layers L]        Qwen1.5-MoE-A2.7B's exact config (optionally fewer layers), random
                                       fp16 weights, written in the hub's own layout (per-expert
                                       gate/up/down_proj, safetensors shards + index) so that
                                       `moe-compile build DIR` goes through the real loading code.
    build CKPT OUT [--lowering L]      `moe-compile build --dtype fp16` in this process: seconds, peak host
          [--no-torch-program]         memory (max RSS), output size.
    parity OUT CKPT                    ORT CUDA (fp16/bf16 build) vs transformers fp32 on the GPU: logits
                                       relative error on 4 prompts, top-1 agreement over 4 x 64 decode
                                       positions fed from the compiled model's own KV cache.
    profile OUT                        per-op-type share of ONNX Runtime CUDA's node time (its profiler),
                                       prefill and decode apart.
    baselines CKPT --json F            transformers on the GPU, same grid as `moe-compile bench`: eager
                                       with batched_mm and grouped_mm experts, static cache +
                                       torch.compile; device copy bandwidth and the batch-1 floor.

All numbers: median of `--repeats`, CUDA synchronised before each clock read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

A27B = dict(  # Qwen/Qwen1.5-MoE-A2.7B config.json
    architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
    moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
    norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=8192, max_window_layers=21,
    rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
    tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02, bos_token_id=151643,
    eos_token_id=151643, router_aux_loss_coef=0.001, output_router_logits=False,
)
SHARD_BYTES = 4 << 30


def hub_tensors(cfg: dict):
    """(name, shape) of every tensor of a Qwen2-MoE checkpoint, in the hub's per-expert layout."""
    h, v, inter, moe, shared = (cfg[k] for k in ("hidden_size", "vocab_size", "intermediate_size",
                                                  "moe_intermediate_size", "shared_expert_intermediate_size"))
    heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], h // cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, rows in (("q", heads * dim), ("k", kv * dim), ("v", kv * dim)):
            yield p + f"self_attn.{name}_proj.weight", (rows, h)
            yield p + f"self_attn.{name}_proj.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, heads * dim)
        yield p + "mlp.gate.weight", (cfg["num_experts"], h)
        for e in range(cfg["num_experts"]):
            yield p + f"mlp.experts.{e}.gate_proj.weight", (moe, h)
            yield p + f"mlp.experts.{e}.up_proj.weight", (moe, h)
            yield p + f"mlp.experts.{e}.down_proj.weight", (h, moe)
        yield p + "mlp.shared_expert.gate_proj.weight", (shared, h)
        yield p + "mlp.shared_expert.up_proj.weight", (shared, h)
        yield p + "mlp.shared_expert.down_proj.weight", (h, shared)
        yield p + "mlp.shared_expert_gate.weight", (1, h)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)
    del inter  # dense MLP size: unused while every layer is sparse (decoder_sparse_step=1)


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from moe_compile.models.embedded import build_tokenizer

    start = time.perf_counter()
    cfg = dict(A27B, num_hidden_layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    shard, shard_bytes, index, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in hub_tensors(cfg):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * cfg["initializer_range"])
            t = t.to(torch.float16).cpu()
        shard[name] = t
        shard_bytes += t.nbytes
        total += t.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"}, model_type="qwen2_moe")
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["eos_token_id"]).save_pretrained(out)
    build_tokenizer(1024).save_pretrained(out)
    return {"layers": layers, "bytes": total, "seconds": time.perf_counter() - start}


def active_bytes(cfg: dict, itemsize: int = 2) -> int:
    """Weights a batch-1 decode step must read: attention, router, shared expert, top-k experts, norms, lm_head."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = h // heads
    attn = h * heads * dim * 2 + h * kv * dim * 2 + (heads + 2 * kv) * dim
    moe = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"] + 3 * h * cfg["shared_expert_intermediate_size"]
    per_layer = attn + moe + cfg["num_experts"] * h + h + 2 * h
    return (cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * h + h) * itemsize


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB, median of 20)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times[3:])


def parity(out: str, ckpt: str, backend: str = "ort-cuda", device: str = "cuda", prompts: int = 4, prompt_len: int = 32,
           positions: int = 64) -> dict:
    from moe_compile.api import load
    from moe_compile.models.loading import load_model
    from moe_compile.runtime.generate import decode_one

    compiled = load(out, backend)
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = load_model(Path(ckpt), "fp32").to(device)
    rng = np.random.default_rng(7)
    errors, agree, total = [], 0, 0
    for _ in range(prompts):
        prompt = rng.integers(3, compiled.manifest.vocab_size, prompt_len).tolist()
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=positions, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            ref = reference(ids).logits[0].float().cpu().numpy()
        cont = ids[0, prompt_len:].tolist()
        backend_ = compiled.backend
        backend_.reset(1)
        got = backend_.step(np.array([prompt]), np.ones((1, prompt_len)), np.arange(prompt_len)[None])[0]
        errors.append(float(np.abs(got - ref[:prompt_len]).max() / np.abs(ref[:prompt_len]).max()))
        mask = np.ones((1, prompt_len), np.int64)
        step_logits = [got[-1]]
        for token in cont[:-1]:
            last, mask = decode_one(backend_, np.array([token]), mask)
            step_logits.append(last[0])
        ours = np.stack(step_logits).argmax(-1)
        theirs = ref[prompt_len - 1 : prompt_len - 1 + len(cont)].argmax(-1)
        agree += int((ours == theirs).sum())
        total += len(cont)
    return {"prompt_logits_relative_error": errors, "max_relative_error": max(errors),
            "top1_agreement": agree / total, "positions": total, "dtype": compiled.manifest.dtype}


def profile(out: str, backend: str = "ort-cuda", prompt_len: int = 128, steps: int = 32) -> dict:
    """Per-op-type share of ONNX Runtime's node time (its own profiler) for one batch-1 prefill and
    `steps` decode steps on ort-cuda, reported separately."""
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime.generate import decode_one, prefill
    from moe_compile.runtime import BACKENDS

    class Profiled(BACKENDS[backend]):
        def session_options(self, options) -> None:
            options.enable_profiling = True
            options.profile_file_prefix = "/tmp/ort-profile"

    backend = Profiled(Path(out), read_manifest(Path(out))).activate()
    prompt = [np.random.default_rng(0).integers(3, backend.manifest.vocab_size, prompt_len).tolist()]
    logits, mask = prefill(backend, prompt, 0)
    for _ in range(steps):
        logits, mask = decode_one(backend, logits.argmax(-1), mask)
    events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    shares = {}
    for phase, (lo, hi) in (("prefill", (runs[0][0], runs[0][1])), ("decode", (runs[1][0], runs[-1][1]))):
        by_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
                op = e.get("args", {}).get("op_name", "?")
                if op in ("If", "Loop", "Scan"):  # their subgraphs' nodes are profiled themselves
                    continue
                by_op[op] = by_op.get(op, 0.0) + e["dur"]
        total = sum(by_op.values()) or 1.0
        wall = sum(b - a for a, b in runs[:1]) if phase == "prefill" else sum(b - a for a, b in runs[1:])
        shares[phase] = {"node_us": total, "run_us": wall, "runs": 1 if phase == "prefill" else len(runs) - 1,
                         "share": {k: round(v / total, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]}}
    return shares


def _time_generate(model, ids, new_tokens: int, **kwargs) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def baselines(ckpt: str, batches: list[int], prompt_lens: list[int], new_tokens: int, repeats: int,
              impls: list[str], budget_s: float) -> dict:
    from moe_compile.models.loading import load_model

    t0 = time.perf_counter()
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    bandwidth = copy_bandwidth()
    floor_bytes = active_bytes(cfg)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": bandwidth / 1e9,
              "active_bytes_b1": floor_bytes, "floor_tok_s_b1": bandwidth / floor_bytes,
              "layers": cfg["num_hidden_layers"], "rows": [], "skipped": []}
    import transformers

    record["transformers"] = transformers.__version__
    model = load_model(Path(ckpt), "fp16").cuda()
    rng = np.random.default_rng(0)
    for impl in impls:
        experts = "grouped_mm" if impl == "static-compile" else impl
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts)
        else:
            model.config._experts_implementation = experts
        extra = {"cache_implementation": "static"} if impl == "static-compile" else {"disable_compile": True}
        for batch in batches:
            for prompt_len in prompt_lens:
                if time.perf_counter() - t0 > budget_s:
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: time budget")
                    continue
                gathered = batch * prompt_len * cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
                if impl == "batched_mm" and gathered > 16e9:  # it copies every token's experts' weights
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: would gather {gathered / 1e9:.0f} GB of weights")
                    continue
                torch.cuda.reset_peak_memory_stats()
                ids = torch.tensor(rng.integers(3, cfg["vocab_size"], (batch, prompt_len)), device="cuda")
                try:
                    with torch.no_grad():
                        warm = _time_generate(model, ids, 4, eos_token_id=None, pad_token_id=0, **extra)
                        one = [_time_generate(model, ids, 1, eos_token_id=None, pad_token_id=0, **extra) for _ in range(repeats)]
                        full = _time_generate(model, ids, new_tokens + 1, eos_token_id=None, pad_token_id=0, **extra)
                except Exception as exc:  # out of memory, a compile failure: recorded, the grid goes on
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: {type(exc).__name__}: {str(exc)[:200]}")
                    print(record["skipped"][-1], flush=True)
                    torch.cuda.empty_cache()
                    continue
                prefill = statistics.median(one)
                row = {"impl": impl, "batch": batch, "prompt_len": prompt_len, "prefill_ms": prefill * 1e3,
                       "decode_tokens_per_s": batch * new_tokens / (full - prefill), "warmup_s": warm,
                       "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20}
                record["rows"].append(row)
                print(json.dumps(row), flush=True)
    return record


def build(ckpt: str, out: str, lowering: str, torch_program: bool) -> dict:
    """`moe-compile build CKPT -o OUT --dtype fp16 --lowering L` in this process: build time and peak host memory."""
    import resource

    from moe_compile.cli import main as cli

    start = time.perf_counter()
    argv = ["build", ckpt, "-o", out, "--dtype", "fp16", "--lowering", lowering, "--max-batch", "8",
            "--max-seq", "2304", "--backend", "onnx"] + ([] if torch_program else ["--no-torch-program"])
    rc = cli(argv)
    return {"rc": rc, "lowering": lowering, "seconds": time.perf_counter() - start,
            "peak_host_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "out_GB": sum(f.stat().st_size for f in Path(out).iterdir()) / 1e9 if rc == 0 else None,
            "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("out")
    c.add_argument("--layers", type=int, default=24)
    p = sub.add_parser("parity")
    p.add_argument("out")
    p.add_argument("ckpt")
    p.add_argument("--json")
    d = sub.add_parser("build")
    d.add_argument("ckpt")
    d.add_argument("out")
    d.add_argument("--lowering", default="auto")
    d.add_argument("--no-torch-program", dest="torch_program", action="store_false")
    d.add_argument("--json")
    f = sub.add_parser("profile")
    f.add_argument("out")
    f.add_argument("--json")
    b = sub.add_parser("baselines")
    b.add_argument("ckpt")
    b.add_argument("--batch", default="1,8")
    b.add_argument("--prompt-len", default="128,2048")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--impls", default="batched_mm,grouped_mm,static-compile")
    b.add_argument("--budget-s", type=float, default=240)
    b.add_argument("--json")
    args = parser.parse_args(argv)
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    if args.command == "checkpoint":
        result = write_checkpoint(Path(args.out), args.layers)
    elif args.command == "build":
        result = build(args.ckpt, args.out, args.lowering, args.torch_program)
    elif args.command == "parity":
        result = parity(args.out, args.ckpt)
    elif args.command == "profile":
        result = profile(args.out)
    else:
        result = baselines(args.ckpt, ints(args.batch), ints(args.prompt_len), args.new_tokens, args.repeats,
                           args.impls.split(","), args.budget_s)
    text = json.dumps(result, indent=1)
    if getattr(args, "json", None):
        Path(args.json).write_text(text + "\n")
    print(text if args.command != "baselines" else json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
