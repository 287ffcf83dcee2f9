#!/usr/bin/env bash
# Issue 6 on the H100 (device tool): the A2.7B-shaped model built, benchmarked and checked on the GPU
# machine, side by side with transformers. Steps (STEPS, comma-separated), each time-limited so that
# one 10-minute command gets as far as it can; results land under $OUT (at most 8 files come back):
#
#   tiny       every family's tiny model built here and checked on ORT CUDA fp32 against transformers
#              (`verify --backend ort-cuda`: logits + 32 greedy tokens);
#   build      Qwen1.5-MoE-A2.7B's config with $LAYERS layers, random fp16 weights in the hub's layout
#              (bench_gpu.py checkpoint), then `moe-compile build --dtype fp16` once per lowering in
#              $LOWERINGS, $JOBS at a time: build time, peak host memory, output size;
#   bench      `moe-compile bench --backend ort-cuda --json` per lowering (batch 1,8 x prompt 128,2048,
#              128 new tokens; `gather` only where its per-token weight copies fit: $GATHER_GRID);
#   parity     the `auto` build (fp16) vs transformers fp32 on the GPU; ORT CUDA profile (per-op share);
#   baselines  transformers eager (batched_mm, grouped_mm), static cache + torch.compile, copy bandwidth.
#
# Expects onnxruntime-gpu in /tmp/devsite (DESIGN.md: the .dev/w1..w5 calls). Runs on the machine's own
# torch 2.11 + transformers 5.17 (the lowest versions the project supports).
#   LAYERS=8 STEPS=build,bench LIMIT=590 bash bench/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-/tmp/e2e-out}
LAYERS=${LAYERS:-8}
LIMIT=${LIMIT:-570}          # seconds for the whole script
WORK=${WORK:-/tmp/a27b}
STEPS=${STEPS:-tiny,build,bench,parity,baselines}
LOWERINGS=${LOWERINGS:-auto,fused,dense,gather}
JOBS=${JOBS:-2}
GATHER_GRID=${GATHER_GRID:---batch 1 --prompt-len 128}
LOG=e2e.log
source "$(dirname "$0")/gpu_common.sh"

python3 -c 'import torch, onnxruntime as o, transformers; print("torch", torch.__version__, "ort", o.__version__, o.get_available_providers(), "transformers", transformers.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1

if has tiny; then
  step "tiny families: build, then verify --backend ort-cuda"
  for family in $(python3 -m moe_compile.cli families | awk '{print $1}'); do
    name=tiny-${family//_/-}
    timeout $(( $(left) - 30 )) python3 -m moe_compile.cli build "$name" -o "$WORK/$name" --max-seq 128 --backend onnx \
      > "$WORK/$name.log" 2>&1 || { echo "$name: build failed: $(tail -1 "$WORK/$name.log")"; continue; }
    echo "$name: $(timeout 120 python3 -m moe_compile.cli verify "$WORK/$name" --backend ort-cuda 2>&1 | tr '\n' ' ')"
  done
fi
if has build; then
  step "checkpoint: A2.7B config, $LAYERS layers, fp16 random, hub layout"
  [ -f "$WORK/ckpt/config.json" ] || timeout $(( $(left) - 60 )) python3 bench/bench_gpu.py checkpoint "$WORK/ckpt" --layers "$LAYERS"
  du -sh "$WORK/ckpt"
  step "moe-compile build --dtype fp16 for $LOWERINGS ($JOBS at a time)"
  echo "$LOWERINGS" | tr ',' '\n' | xargs -P "$JOBS" -I{} sh -c \
    "timeout $(( $(left) - 30 )) python3 bench/bench_gpu.py build $WORK/ckpt $WORK/build-{} --lowering {} --no-torch-program --json $WORK/build-{}.json > $WORK/build-{}.log 2>&1; grep -E '^error|^built' $WORK/build-{}.log; tr -d '\\n ' < $WORK/build-{}.json; echo"
  df -h /tmp | tail -1
fi
if has bench; then
  for lowering in ${LOWERINGS//,/ }; do
    [ -f "$WORK/build-$lowering/manifest.json" ] || { echo "no build-$lowering"; continue; }
    grid="--batch 1,8 --prompt-len 128,2048"
    [ "$lowering" = gather ] && grid=$GATHER_GRID
    step "moe-compile bench --backend ort-cuda: $lowering ($grid)"
    timeout $(( $(left) - 20 )) python3 -m moe_compile.cli bench "$WORK/build-$lowering" --backend ort-cuda $grid \
      --new-tokens 128 --json > "$OUT/bench-$lowering.json"
    python3 -c 'import json,sys; from moe_compile.runtime.benchmark import table; print("\n".join(table(json.load(open(sys.argv[1])))))' "$OUT/bench-$lowering.json"
  done
fi
if has parity && [ -f "$WORK/build-auto/manifest.json" ]; then
  step "parity: auto fp16 vs transformers fp32 (GPU); ORT CUDA profile"
  timeout $(( $(left) - 60 )) python3 bench/bench_gpu.py parity "$WORK/build-auto" "$WORK/ckpt" --json "$OUT/parity.json"
  timeout $(( $(left) - 30 )) python3 bench/bench_gpu.py profile "$WORK/build-auto" --json "$OUT/profile.json"
fi
if has baselines; then
  step "transformers baselines (budget $(( $(left) - 30 )) s)"
  timeout $(( $(left) - 10 )) python3 bench/bench_gpu.py baselines "$WORK/ckpt" --json "$OUT/baselines.json" --budget-s $(( $(left) - 40 ))
fi
step "done"
