"""Per-kernel CUDA time of an ort-form build's decode steps on ort-cuda (CUPTI, through torch.profiler,
sees ONNX Runtime's kernels): wall ms per step over 50 steps, then GPU us per step by kernel over 20.

    python bench/ort_step_kernels.py BUILD on|off        # on: CUDA graphs (GPU machine, onnxruntime-gpu)
The file name must not be kernels.py: transformers imports a package of that name."""
import sys, time, json, collections, numpy as np, torch
import transformers
from transformers import AttentionInterface
import moe_compile
from torch.profiler import profile, ProfilerActivity
from moe_compile.runtime.generate import prefill, decode_one
from moe_compile.runtime.sampling import Chooser
out, graph = sys.argv[1], sys.argv[2] == "on"
m = moe_compile.load(out, "ort-cuda", cuda_graph=graph)
b = m.backend; g = Chooser()
prompt = [list(np.random.default_rng(0).integers(10, 30000, 128))]
tok, mask = prefill(b, prompt, 0, g)
for _ in range(5): tok, mask = decode_one(b, tok, mask, g)
torch.cuda.synchronize(); t = time.perf_counter(); n = 50
for _ in range(n): tok, mask = decode_one(b, tok, mask, g)
torch.cuda.synchronize(); wall = (time.perf_counter() - t) / n * 1e3
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(20): tok, mask = decode_one(b, tok, mask, g)
    torch.cuda.synchronize()
agg = collections.Counter(); cnt = collections.Counter()
for e in p.events():
    if e.device_type.name == "CUDA":
        agg[e.name[:90]] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total; cnt[e.name[:90]] += 1
tot = sum(agg.values()) / 20
print(json.dumps({"graph": graph, "wall_ms_per_step": wall, "gpu_us_per_step": tot, "kernels_per_step": sum(cnt.values()) / 20}))
for k, v in agg.most_common(25): print(f"{v/20:9.1f} us/step {cnt[k]/20:6.1f}/step  {k}")
