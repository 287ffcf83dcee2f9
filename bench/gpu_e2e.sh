#!/usr/bin/env bash
# Issue 6 end to end on the H100 (device tool), in priority order, each step time-limited so that one
# 10-minute command gets as far as it can; results land under $OUT (at most 8 files come back).
#
#   1. tiny-family parity on ORT CUDA fp32: `verify --backend ort-cuda` on builds carried in .dev/i6/tiny
#      (built on the CPU machine; their checkpoints in .dev/i6/cache), plus `moe-compile bench` on one;
#   2. Qwen1.5-MoE-A2.7B's config with $LAYERS layers, random fp16 weights in the hub's layout
#      (bench/bench_gpu.py checkpoint), built with `moe-compile build --dtype fp16` on this machine's CPU:
#      build time, peak host memory (max RSS), sizes;
#   3. `moe-compile bench --backend ort-cuda --json` (batch 1,8 x prompt 128,2048, 128 new tokens);
#   4. parity of that build vs transformers fp32 on the GPU; an ORT profile (per-op time share);
#   5. transformers baselines (eager batched_mm / grouped_mm, static cache + torch.compile), copy
#      bandwidth and the batch-1 floor, with whatever time is left.
#
# Expects onnxruntime-gpu installed in /tmp/devsite (DESIGN.md: .dev/w1..w5 calls) and carries
# .dev/i6 (tiny builds, checkpoints, transformers 5.23 + regex wheels: the CPU side's versions).
#   LAYERS=8 LIMIT=570 [STEPS=tiny,a27b,baselines] [DEFER_GUARDS=1] bash bench/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-/tmp/e2e-out}
LAYERS=${LAYERS:-8}
LIMIT=${LIMIT:-570}          # seconds for the whole script
WORK=${WORK:-/tmp/a27b}
STEPS=${STEPS:-tiny,a27b,baselines}   # also: guards (where export adds batch guards)
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/e2e.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/i6site:/tmp/devsite:$PWD MOE_COMPILE_CACHE=$PWD/.dev/i6/cache
export TOKENIZERS_PARALLELISM=false
left() { echo $((LIMIT - SECONDS)); }
step() { echo; echo "=== [$(date -u +%H:%M:%S) t=${SECONDS}s] $*"; }

step "install transformers 5.23 + regex into /tmp/i6site (kept apart from the shared /tmp/devsite)"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/i6site .dev/i6/whl/*.whl 2>&1 | tail -2
python3 -c 'import torch, onnxruntime as o, transformers, onnx, onnxscript; print("torch", torch.__version__, "ort", o.__version__, o.get_available_providers(), "transformers", transformers.__version__, "onnx", onnx.__version__, "onnxscript", onnxscript.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1

if [[ ",$STEPS," == *",guards,"* ]]; then
step "0. where torch $(python3 -c 'import torch; print(torch.__version__)') guards the batch size (A2.7B structure, toy sizes)"
python3 bench/bench_gpu.py checkpoint /tmp/a27b-small --layers 1 --small > /dev/null
timeout 120 python3 bench/bench_gpu.py guards /tmp/a27b-small
fi
if [[ ",$STEPS," == *",tiny,"* ]]; then
step "1. tiny families: ORT CUDA fp32 greedy tokens vs transformers (verify --backend ort-cuda)"
timeout 150 python3 - <<'EOF'
import sys
from pathlib import Path
from moe_compile.verify import verify
failed = 0
for out in sorted(Path(".dev/i6/tiny").iterdir()):
    try:
        report = verify(out, backend="ort-cuda")
        print(f"{out.name:24} {' | '.join(report.lines())}", flush=True)
        failed += not report.passed
    except Exception as exc:
        print(f"{out.name:24} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        failed += 1
print("tiny parity:", "all PASS" if not failed else f"{failed} FAILED")
EOF
timeout 60 python3 -m moe_compile.cli bench .dev/i6/tiny/tiny-qwen2-moe --backend ort-cuda --batch 1,4 --prompt-len 8,64 --new-tokens 32
fi
if [[ ",$STEPS," == *",a27b,"* ]]; then

step "2. A2.7B-shaped checkpoint ($LAYERS layers, fp16 random, hub layout) + moe-compile build --dtype fp16"
timeout $(( $(left) - 200 )) python3 bench/bench_gpu.py checkpoint "$WORK/ckpt" --layers "$LAYERS"
du -sh "$WORK/ckpt"
timeout $(( $(left) - 150 )) python3 bench/bench_gpu.py build "$WORK/ckpt" "$WORK/build" ${DEFER_GUARDS:+--defer-guards}
ls -la "$WORK/build"; du -sh "$WORK/build"; df -h /tmp | tail -1
fi
if [[ ",$STEPS," == *",a27b,"* && -f "$WORK/build/manifest.json" ]]; then
step "3. moe-compile bench --backend ort-cuda"
timeout $(( $(left) - 120 )) python3 -m moe_compile.cli bench "$WORK/build" --backend ort-cuda --batch 1,8 --prompt-len 128,2048 \
    --new-tokens 128 --json > "$OUT/bench_ort_cuda.json"
python3 -c 'import json,sys; from moe_compile.runtime.benchmark import table; print("\n".join(table(json.load(open(sys.argv[1])))))' "$OUT/bench_ort_cuda.json"

step "4. parity fp16 vs transformers fp32 (GPU), ORT profile"
timeout $(( $(left) - 90 )) python3 bench/bench_gpu.py parity "$WORK/build" "$WORK/ckpt" --json "$OUT/parity_a27b.json"
timeout $(( $(left) - 80 )) python3 bench/bench_gpu.py profile "$WORK/build" --json "$OUT/profile.json"

fi
if [[ ",$STEPS," == *",baselines,"* ]]; then
step "5. transformers baselines (budget $(( $(left) - 30 )) s)"
[ -f "$WORK/ckpt/config.json" ] || python3 bench/bench_gpu.py checkpoint "$WORK/ckpt" --layers "$LAYERS"
timeout $(( $(left) - 10 )) python3 bench/bench_gpu.py baselines "$WORK/ckpt" --json "$OUT/baselines.json" --budget-s $(( $(left) - 40 ))
fi
step "done"
