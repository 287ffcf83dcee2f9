"""GPU end-to-end pieces for issues 6 and 11, run by bench/gpu_e2e.sh and bench/gpu_issue11.sh (each a subcommand):

    checkpoint DIR [--layers L]        Qwen1.5-MoE-A2.7B's exact config (optionally fewer layers), random
                                       fp16 weights, written in the hub's own layout (per-expert
                                       gate/up/down_proj, safetensors shards + index) so that
                                       `moe-compile build DIR` goes through the real loading code.
    build CKPT OUT [--form F]          `moe-compile build --dtype fp16` in this process: seconds, peak host
          [--lowering L] [--dtype D]   memory (max RSS), output size, the form the build got.
          [--no-torch-program]
    parity OUT CKPT                    ORT CUDA (fp16/bf16 build) vs transformers fp32 on the GPU: logits
                                       relative error and top-1 agreement at 4 prompts x 64 positions (the
                                       last prompt position + 63 decode steps, teacher-forced through the
                                       compiled model's own KV cache); pass = max error <= 2e-2, top-1 >= 99%.
    shapes OUT CKPT                    a real-shape check of one build: parity at prompt 128 and 2048.
    profile OUT                        per-op-type share of ONNX Runtime CUDA's node time (its profiler),
                                       prefill and decode apart (CUDA graphs off).
    baselines CKPT --json F            transformers on the GPU, same grid as `moe-compile bench`: eager
                                       generate with batched_mm and grouped_mm experts; generate with a
                                       StaticCache (which it compiles), warmed up per (batch, prompt) by
                                       identical calls, counting the graphs compiled while timing (0 = no
                                       recompile);
                                       copy bandwidth and the batch-1 floor.
    split-repro [--build OUT]          issue 11's `auto` failure on ORT CUDA cut down: the dense branch at
                                       the A2.7B shape alone and inside an If, ORT optimisations on/off,
                                       token counts 4..2048; with --build, that build's prefills too.

All numbers: median of `--repeats`, the device synchronised before each clock read.
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


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes read + written per second of one large copy (moe_compile.runtime.floor: `bench` uses the same)."""
    from moe_compile.runtime.floor import copy_bandwidth as measured

    return measured(device)


def parity(out: str, ckpt: str, backend: str = "ort-cuda", device: str = "cuda", prompts: int = 4, prompt_len: int = 32,
           positions: int = 64, cuda_graph: bool = True, reference=None, compiled=None) -> dict:
    """`prompts` random prompts; per prompt, the last prompt position and `positions - 1` decode steps fed
    with the fp32 reference's greedy continuation (teacher-forced, through the compiled model's own KV
    cache): `prompts x positions` positions in all (256 by default). The logits' relative error as
    verify.py measures it (max |ours - ref| over max |ref|, all positions), the same per position (worst,
    median, p99: a router near-tie in fp16 shows up as one bad position), and top-1 agreement.
    Last-position logits only: what both build forms serve (the ort form's graph has no other logits)."""
    from moe_compile.api import load
    from moe_compile.models.loading import load_model
    from moe_compile.runtime.generate import decode_one, prefill

    compiled = compiled or load(out, backend, cuda_graph)
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = reference or load_model(Path(ckpt), "fp32").to(device)
    rng = np.random.default_rng(7)
    errors, agree, worst_abs, scale = [], [], 0.0, 0.0
    for _ in range(prompts):
        prompt = rng.integers(3, compiled.manifest.vocab_size, prompt_len).tolist()
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=positions, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            ref = reference(ids).logits[0, prompt_len - 1 : prompt_len - 1 + positions].float().cpu().numpy()
        cont = ids[0, prompt_len:].tolist()
        last, mask = prefill(compiled.backend, [prompt], 0)
        ours = [last[0]]
        for token in cont[: positions - 1]:
            last, mask = decode_one(compiled.backend, np.array([token]), mask)
            ours.append(last[0])
        ours = np.stack(ours)
        errors += (np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)).tolist()
        worst_abs, scale = max(worst_abs, float(np.abs(ours - ref).max())), max(scale, float(np.abs(ref).max()))
        agree += (ours.argmax(-1) == ref.argmax(-1)).tolist()
    result = {"positions": len(agree), "relative_error": worst_abs / scale,
              "worst_position_relative_error": max(errors), "median_position_relative_error": float(np.median(errors)),
              "p99_position_relative_error": float(np.quantile(errors, 0.99)), "top1_agreement": float(np.mean(agree)),
              "dtype": compiled.manifest.dtype, "form": getattr(compiled.manifest, "form", "portable"),
              "lowering": compiled.manifest.lowering, "backend": backend, "cuda_graph": cuda_graph}
    # issue 11's bar; the error as verify.py measures it: the largest |ours - ref| over the largest |ref|, all positions
    result["pass"] = result["relative_error"] <= 2e-2 and result["top1_agreement"] >= 0.99
    return result


def shapes(out: str, ckpt: str, prompt_lens: list[int], positions: int = 8, backend: str = "ort-cuda") -> dict:
    """A real-shape check of one build: parity (1 prompt, `positions` positions) at each prompt length,
    e.g. 128 and 2048 (auto's dense branch, long prefills); a failure is recorded, not raised."""
    from moe_compile.api import load
    from moe_compile.models.loading import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = load_model(Path(ckpt), "fp32").to(device)
    compiled = load(out, backend)
    manifest = compiled.manifest
    results = []
    for length in prompt_lens:
        try:
            result = parity(out, ckpt, backend, device, 1, length, positions, reference=reference, compiled=compiled)
        except Exception as exc:  # the failure is the finding
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"}
        results.append({"prompt_len": length, **result})
        print(json.dumps(results[-1]), flush=True)
    return {"build": out, "lowering": manifest.lowering, "form": getattr(manifest, "form", "portable"), "results": results}


def tiny(family: str, dtype: str, work: str, backend: str = "ort-cuda") -> dict:
    """One tiny family: `moe-compile build tiny-<family> --form auto --dtype D`, the form it got (and why),
    then `verify --backend ort-cuda` (CUDA graphs on). Failures are recorded, not raised."""
    import contextlib
    import io

    from moe_compile.cli import main as cli

    name = "tiny-" + family.replace("_", "-")
    out = Path(work) / f"{name}-{dtype}"
    row = {"build": out.name}
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = cli(["build", name, "-o", str(out), "--form", "auto", "--dtype", dtype, "--max-seq", "128", "--backend", "onnx"])
    if rc != 0:
        return {**row, "error": "build: " + (log.getvalue().strip().splitlines() or ["?"])[-1][:300]}
    manifest = json.loads((out / "manifest.json").read_text())
    row.update(form=manifest.get("form"), form_reason=manifest.get("form_reason"), lowering=manifest.get("lowering"))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rc = cli(["verify", str(out), "--backend", backend])
        except Exception as exc:  # a provider failure is the finding
            rc = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    lines = [line for line in log.getvalue().splitlines() if line.startswith(("logits", "greedy", "PASS", "FAIL", "error"))]
    return {**row, "rc": rc, "verify": lines}


def profile(out: str, backend: str = "ort-cuda", prompt_len: int = 128, steps: int = 32) -> dict:
    """Per-op-type share of ONNX Runtime's node time (its own profiler) for one batch-1 prefill and
    `steps` decode steps on ort-cuda, reported separately (CUDA graphs off: the profiler sees nodes)."""
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime.generate import decode_one, prefill
    from moe_compile.runtime import BACKENDS

    manifest = read_manifest(Path(out))
    try:  # the backend variant that serves this build's form (runtime/backend.py FORMS)
        from moe_compile.runtime.backend import FORMS

        base = FORMS.get((backend, getattr(manifest, "form", "portable")), BACKENDS[backend])
    except ImportError:
        base = BACKENDS[backend]

    class Profiled(base):
        def __new__(cls, *args, **kwargs):  # this class, not the form's variant that Backend.__new__ picks
            return object.__new__(cls)

        def session_options(self, options) -> None:
            super().session_options(options)
            options.enable_profiling = True
            options.profile_file_prefix = "/tmp/ort-profile"

    try:
        backend = Profiled(Path(out), manifest, cuda_graph=False).activate()
    except TypeError:  # a runtime without the cuda_graph option
        backend = Profiled(Path(out), manifest).activate()
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_generate(model, ids, new_tokens: int, **kwargs) -> float:
    _sync(ids.device.type)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    _sync(ids.device.type)
    return time.perf_counter() - start


def graphs_compiled() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process: a rise while timing is a recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _static_compile_row(model, ids, new_tokens: int, repeats: int, caches: dict) -> dict:
    """transformers' own recipe for a compiled decode: generate with a StaticCache, which generate compiles
    (torch.compile, its default CompileConfig: mode "reduce-overhead", dynamic False). One cache per batch
    size at one fixed length, reset in place before every call, so every call has the same shapes: the
    warm-up calls (identical to the timed ones) compile and capture, the timed ones must not recompile
    (graphs_compiled_timed says whether they did)."""
    from transformers import StaticCache

    batch = ids.shape[0]
    if batch not in caches:
        caches[batch] = StaticCache(config=model.config, max_cache_len=caches["max_len"])
    cache = caches[batch]
    kwargs = {"eos_token_id": None, "pad_token_id": 0, "past_key_values": cache}

    def timed(steps: int) -> float:
        cache.reset()
        return _time_generate(model, ids, steps, **kwargs)

    before = graphs_compiled()
    start = time.perf_counter()
    for _ in range(2):
        timed(1), timed(new_tokens + 1)
    warmup_s, warm_graphs = time.perf_counter() - start, graphs_compiled() - before
    prefill = statistics.median([timed(1) for _ in range(repeats)])
    full = timed(new_tokens + 1)
    return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": batch * new_tokens / (full - prefill),
            "decode_ms_per_step": (full - prefill) / new_tokens * 1e3, "warmup_s": warmup_s,
            "graphs_compiled_warmup": warm_graphs, "graphs_compiled_timed": graphs_compiled() - before - warm_graphs}


def _generate_row(model, ids, new_tokens: int, repeats: int) -> dict:
    """transformers' generate, eager (compile disabled): warm-up, timed 1-token runs (the prefill), one timed run."""
    kwargs = {"eos_token_id": None, "pad_token_id": 0, "disable_compile": True}
    start = time.perf_counter()
    _time_generate(model, ids, 4, **kwargs)
    warmup_s = time.perf_counter() - start
    prefill = statistics.median([_time_generate(model, ids, 1, **kwargs) for _ in range(repeats)])
    full = _time_generate(model, ids, new_tokens + 1, **kwargs)
    return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": ids.shape[0] * new_tokens / (full - prefill),
            "decode_ms_per_step": (full - prefill) / new_tokens * 1e3, "warmup_s": warmup_s}


def baselines(ckpt: str, batches: list[int], prompt_lens: list[int], new_tokens: int, repeats: int,
              impls: list[str], budget_s: float, dtype: str = "fp16") -> dict:
    """transformers on the GPU (or the CPU where there is none), same grid as `moe-compile bench`. `impls`:
    `batched_mm`, `grouped_mm` (eager generate with that experts implementation) and `static-compile`
    (generate with a StaticCache, compiled by generate; `static-compile:batched_mm` picks the experts
    implementation, which generate may switch for decode, as it does on a GPU).
    Every static-compile row reports the graphs compiled while warming up and while timing (0 = no
    recompile in the timed run)."""
    import torch._dynamo

    from moe_compile.models.loading import load_model

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    bandwidth = copy_bandwidth(device)
    floor_bytes = active_bytes(cfg)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    record = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "copy_GBps": bandwidth / 1e9, "active_bytes_b1": floor_bytes, "floor_tok_s_b1": bandwidth / floor_bytes,
              "layers": cfg["num_hidden_layers"], "rows": [], "skipped": []}
    import transformers

    record["transformers"] = transformers.__version__
    model = load_model(Path(ckpt), dtype).to(device)
    rng = np.random.default_rng(0)
    for impl in impls:
        kind, _, experts = impl.partition(":")
        experts = experts or ("grouped_mm" if kind == "static-compile" else kind)
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts)
        else:
            model.config._experts_implementation = experts
        caches = {"max_len": max(prompt_lens) + new_tokens + 1} if kind == "static-compile" else None
        for batch in batches:
            for prompt_len in prompt_lens:
                if time.perf_counter() - t0 > budget_s:
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: time budget")
                    continue
                gathered = batch * prompt_len * cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
                if experts == "batched_mm" and gathered > 16e9:  # it copies every token's experts' weights
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: would gather {gathered / 1e9:.0f} GB of weights")
                    continue
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ids = torch.tensor(rng.integers(3, cfg["vocab_size"], (batch, prompt_len)), device=device)
                try:
                    with torch.no_grad():
                        measured = (_static_compile_row(model, ids, new_tokens, repeats, caches) if caches
                                    else _generate_row(model, ids, new_tokens, repeats))
                except Exception as exc:  # out of memory, a compile failure: recorded, the grid goes on
                    record["skipped"].append(f"{impl} b{batch} p{prompt_len}: {type(exc).__name__}: {str(exc)[:300]}")
                    print(record["skipped"][-1], flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                row = {"impl": impl, "batch": batch, "prompt_len": prompt_len, **measured,
                       "floor_tok_s": batch * bandwidth / floor_bytes if batch == 1 else None,
                       "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
                record["rows"].append(row)
                print(json.dumps(row), flush=True)
    return record


def _dense_branch_model(experts: int, inter: int, hidden: int, wrap_in_if: bool, threshold: int = 8):
    """The `dense` lowering's ONNX at real shapes (fp16), alone or as the else branch of auto's If:

        x [T,H] ─Transpose─▶ [H,T] ─MatMul(W_gu [E,2I,H])─▶ [E,2I,T] ─Split(axis 1, 2)─▶ g, u
        g·sigmoid(g)·u [E,I,T] ─MatMul(W_down [E,H,I])─▶ [E,H,T] ─ReduceSum(axis 0)─▶ [H,T]

    In the If form the then branch is Transpose(x) (the gather branch is not what fails) and the
    condition is Shape(x)[0] <= threshold, computed in the graph as the export does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f16 = TensorProto.FLOAT16
    weights = [numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16), name)
               for name, shape in (("w_gu", (experts, 2 * inter, hidden)), ("w_down", (experts, hidden, inter)))]
    axes = [numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array(threshold, np.int64), "threshold")]
    dense = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="node_t"),
        helper.make_node("MatMul", ["w_gu", "xt"], ["h"], name="node_matmul"),
        helper.make_node("Split", ["h"], ["g", "u"], axis=1, num_outputs=2, name="node_Split_1"),
        helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "u"], ["a"]),
        helper.make_node("MatMul", ["w_down", "a"], ["y"], name="node_matmul_1"),
        helper.make_node("ReduceSum", ["y", "axis0"], ["out_dense"], keepdims=0),
    ]
    out = helper.make_tensor_value_info("out", f16, ["H", "T"])
    if wrap_in_if:
        dense_graph = helper.make_graph(dense, "else_branch", [], [helper.make_tensor_value_info("out_dense", f16, None)])
        then = helper.make_graph([helper.make_node("Transpose", ["x"], ["out_then"], perm=[1, 0])], "then_branch", [],
                                 [helper.make_tensor_value_info("out_then", f16, None)])
        nodes = [helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),
                 helper.make_node("Squeeze", ["shape", "axis0"], ["tokens"]),
                 helper.make_node("LessOrEqual", ["tokens", "threshold"], ["few"]),
                 helper.make_node("If", ["few"], ["out"], then_branch=then, else_branch=dense_graph, name="node_cond__0")]
    else:
        nodes = dense + [helper.make_node("Identity", ["out_dense"], ["out"])]
    graph = helper.make_graph(nodes, "dense_if" if wrap_in_if else "dense", [helper.make_tensor_value_info("x", f16, ["T", hidden])],
                              [out], initializer=weights + axes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model, [onnx.numpy_helper.to_array(w) for w in weights]


def split_repro(tokens: list[int], provider: str = "CUDAExecutionProvider", experts: int = 60, inter: int = 1408,
                hidden: int = 2048, checked: int = 16) -> dict:
    """Issue 11's `auto` failure ("Split node 'node_Split_1' (inside If 'node_cond__0'): CUDA error
    cudaErrorInvalidValue" on ORT CUDA at the A2.7B shape) cut down to the dense branch: for each of
    {dense alone, dense inside If} x {ORT optimisations all, none} x token counts, whether ONNX Runtime
    runs it and how far its first `checked` tokens are from numpy (out[:, t] depends on token t alone).

    The hypothesis it tests: ORT's CUDA kernels count elements in int32 (CUDA_LONG), and the dense
    branch's MatMul output [E, 2I, T], which Split reads first, passes 2^31 elements above
    T = 2^31 / (E·2I) = 12,710 tokens at this shape (batch 8 x prompt 2048 = 16,384 tokens: 2.77e9), so
    Split's grid size goes negative. Run with CUDA_LAUNCH_BLOCKING=1 as well: an error that a kernel
    launch left behind is then reported by that kernel's own node."""
    import onnxruntime as ort

    results = []
    record = {"provider": provider, "shape": {"experts": experts, "inter": inter, "hidden": hidden},
              "int32_limit_tokens": (2**31 - 1) // (experts * 2 * inter), "cases": results}
    for wrap in (False, True):
        model, (w_gu, w_down) = _dense_branch_model(experts, inter, hidden, wrap)
        blob = model.SerializeToString()
        for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            options.log_severity_level = 3
            case = {"graph": "dense in If" if wrap else "dense", "optimisation": level}
            try:
                session = ort.InferenceSession(blob, options, providers=[provider, "CPUExecutionProvider"])
            except Exception as exc:
                results.append({**case, "error": f"session: {str(exc)[:300]}"})
                continue
            for t in tokens:
                x = (np.random.default_rng(t).standard_normal((t, hidden), dtype=np.float32) * 0.5).astype(np.float16)
                try:
                    got = session.run(None, {"x": x})[0][:, :checked].astype(np.float32)
                except Exception as exc:
                    results.append({**case, "tokens": t, "error": str(exc).splitlines()[0][:300]})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                first = x[:checked].T.astype(np.float32)
                if wrap and t <= 8:
                    want = first
                else:
                    h = np.matmul(w_gu.astype(np.float32), first)
                    g, u = np.split(h, 2, axis=1)
                    want = np.matmul(w_down.astype(np.float32), g / (1 + np.exp(-g)) * u).sum(0)
                error = float(np.abs(got - want).max() / np.abs(want).max())
                results.append({**case, "tokens": t, "relative_error": error})
                print(json.dumps(results[-1]), flush=True)
        del session
    return record


def auto_repro(out: str, cases: list[tuple[int, int]], backend: str = "ort-cuda") -> dict:
    """The real build: one prefill per (batch, prompt length), ONNX Runtime's optimisations all vs none."""
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime import BACKENDS
    from moe_compile.runtime.generate import prefill

    results = []
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        class Configured(BACKENDS[backend]):
            def session_options(self, options, level=level) -> None:
                import onnxruntime as ort

                options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)

        runner = Configured(Path(out), read_manifest(Path(out))).activate()
        for batch, length in cases:
            prompts = np.random.default_rng(length).integers(3, runner.manifest.vocab_size, (batch, length)).tolist()
            case = {"optimisation": level, "batch": batch, "prompt_len": length}
            try:
                prefill(runner, prompts, 0)
                results.append({**case, "ok": True})
            except Exception as exc:
                results.append({**case, "error": str(exc).splitlines()[0][:300]})
            print(json.dumps(results[-1]), flush=True)
        del runner
    return {"build": out, "backend": backend, "cases": results}


def build(ckpt: str, out: str, lowering: str | None, torch_program: bool, form: str | None = None,
          dtype: str = "fp16") -> dict:
    """`moe-compile build CKPT -o OUT --dtype D [--form F] [--lowering L]` in this process: build time and
    peak host memory."""
    import resource

    from moe_compile.cli import main as cli

    start = time.perf_counter()
    argv = ["build", ckpt, "-o", out, "--dtype", dtype, "--max-batch", "8", "--max-seq", "2304", "--backend", "onnx"]
    argv += (["--form", form] if form else []) + (["--lowering", lowering] if lowering else [])
    argv += [] if torch_program else ["--no-torch-program"]
    rc = cli(argv)
    manifest = Path(out) / "manifest.json"
    recorded = json.loads(manifest.read_text()) if rc == 0 and manifest.is_file() else {}
    return {"rc": rc, "lowering": recorded.get("lowering", lowering), "form": recorded.get("form"),
            "form_reason": recorded.get("form_reason"), "seconds": time.perf_counter() - start,
            "peak_host_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "out_GB": sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file()) / 1e9 if rc == 0 else None,
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
    p.add_argument("--backend", default="ort-cuda")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--positions", type=int, default=64, help="per prompt: the last prompt position + positions-1 steps")
    p.add_argument("--json")
    d = sub.add_parser("build")
    d.add_argument("ckpt")
    d.add_argument("out")
    d.add_argument("--form", choices=["auto", "ort", "portable"])
    d.add_argument("--lowering")
    d.add_argument("--dtype", default="fp16")
    d.add_argument("--no-torch-program", dest="torch_program", action="store_false")
    d.add_argument("--json")
    f = sub.add_parser("profile")
    f.add_argument("out")
    f.add_argument("--backend", default="ort-cuda")
    f.add_argument("--json")
    b = sub.add_parser("baselines")
    b.add_argument("ckpt")
    b.add_argument("--batch", default="1,8")
    b.add_argument("--prompt-len", default="128,2048")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--impls", default="batched_mm,grouped_mm,static-compile")
    b.add_argument("--budget-s", type=float, default=240)
    b.add_argument("--dtype", default="fp16")
    b.add_argument("--json")
    t = sub.add_parser("tiny")
    t.add_argument("family")
    t.add_argument("dtype")
    t.add_argument("--work", required=True)
    t.add_argument("--backend", default="ort-cuda")
    h = sub.add_parser("shapes")
    h.add_argument("out")
    h.add_argument("ckpt")
    h.add_argument("--prompt-lens", default="128,2048")
    h.add_argument("--positions", type=int, default=8)
    h.add_argument("--backend", default="ort-cuda")
    h.add_argument("--json")
    r = sub.add_parser("split-repro")
    r.add_argument("--tokens", default="4,9,128,2048,16384")
    r.add_argument("--backend", default="ort-cuda", help="for --build; ort: the CPU provider")
    r.add_argument("--build", help="also prefill this build (batch 1, --prompt-lens), ORT optimisations all vs none")
    r.add_argument("--cases", default="1x4,1x9,1x128,1x2048,8x128,8x2048", help="BATCHxPROMPT prefills of --build")
    r.add_argument("--json")
    args = parser.parse_args(argv)
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    if args.command == "checkpoint":
        result = write_checkpoint(Path(args.out), args.layers)
    elif args.command == "build":
        result = build(args.ckpt, args.out, args.lowering, args.torch_program, args.form, args.dtype)
    elif args.command == "parity":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = parity(args.out, args.ckpt, args.backend, device, prompts=args.prompts, prompt_len=args.prompt_len,
                        positions=args.positions, cuda_graph=args.cuda_graph)
    elif args.command == "profile":
        result = profile(args.out, args.backend)
    elif args.command == "tiny":
        result = tiny(args.family, args.dtype, args.work, args.backend)
        print(json.dumps(result))
        return 0
    elif args.command == "shapes":
        result = shapes(args.out, args.ckpt, ints(args.prompt_lens), args.positions, args.backend)
    elif args.command == "split-repro":
        provider = "CPUExecutionProvider" if args.backend == "ort" else "CUDAExecutionProvider"
        result = split_repro(ints(args.tokens), provider)
        if args.build:
            cases = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")]
            result["build"] = auto_repro(args.build, cases, args.backend)
    else:
        result = baselines(args.ckpt, ints(args.batch), ints(args.prompt_len), args.new_tokens, args.repeats,
                           args.impls.split(","), args.budget_s, args.dtype)
    text = json.dumps(result, indent=1)
    if getattr(args, "json", None):
        Path(args.json).write_text(text + "\n")
    print(text if args.command != "baselines" else json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
