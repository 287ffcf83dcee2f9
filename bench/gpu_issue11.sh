#!/usr/bin/env bash
# Issue 11 on the H200 (device tool, repository root): the ort form on ORT CUDA (CUDA graphs on and
# off), the portable form beside it, transformers baselines, real-shape checks of every lowering and
# the `auto` failure's repro. Steps (STEPS, comma-separated) run in this order, each cut off by the
# time left (LIMIT, seconds for the whole command); results land under $OUT (8 files at most come
# back: issue11.log plus one JSON file per step).
#
#   tiny       every family's tiny model built here with --form auto (the ort form where the family
#              has it, else portable: the manifest's form/form_reason is recorded), $TINY_DTYPES,
#              $JOBS at a time, then `verify --backend ort-cuda` (CUDA graphs on)          -> tiny.json
#   shapes     A2.7B config with $SHAPE_LAYERS layers; portable builds for $SHAPE_LOWERINGS; each
#              checked against transformers fp32 at prompt $SHAPE_PROMPTS (gather: $GATHER_PROMPTS,
#              its per-token weight copies at 2048 tokens need ~140 GB); then the `auto` repro:
#              the dense branch alone and inside an If at the A2.7B shape, ORT optimisations on/off,
#              $REPRO_TOKENS tokens (the hypothesis: int32 element counts in ORT's CUDA kernels, passed
#              by [E, 2I, T] above 12,710 tokens), and the auto build's prefills ($REPRO_CASES),
#              each also with CUDA_LAUNCH_BLOCKING=1                                 -> shapes.json
#   ckpt       A2.7B config with $LAYERS layers (24 = the issue's benchmark), fp16 random, hub layout
#   ort        `moe-compile build --form ort --dtype fp16`; `moe-compile bench --backend ort-cuda`
#              (batch $BATCHES x prompt $PROMPTS, $NEW new tokens) with CUDA graphs on, once per
#              $MOE_KERNELS (ours: the moe_compile:FusedMoE custom op, needs MOE_COMPILE_ORT_OPS_LIB or
#              ONNXRUNTIME_INCLUDE_DIR; ort: ONNX Runtime's MoE), and with --no-cuda-graph;
#              parity vs transformers fp32 (4 prompts x 64 positions); ORT profile
#              (CUDA graphs off); the build is deleted after unless KEEP=1 (disk: 64 GB)
#              per-kernel GPU time of a decode step (bench/ort_step_kernels.py, CUDA graphs on)
#                                                           -> bench-ort.json, parity.json, kernels.txt
#   portable   `--form portable --lowering $PORTABLE_LOWERING` (default fused), bench   -> bench-portable.json
#   baselines  transformers eager (batched_mm, grouped_mm) and StaticCache + torch.compile, same grid,
#              graphs compiled while timing reported (0 = no recompile)             -> baselines.json
#   plugins    our fused MoE kernels: build (sm_90), `pytest tests/plugins`          (in issue11.log)
#
# Expects onnxruntime-gpu in /tmp/devsite (../shared/tools/device-wheels: five calls first). Device time
# is short (30 min a session): split the steps over calls, e.g.
#   STEPS=tiny,shapes LIMIT=580 bash bench/gpu_issue11.sh
#   STEPS=ckpt,ort LAYERS=24 LIMIT=580 bash bench/gpu_issue11.sh
#   STEPS=portable,baselines,plugins LAYERS=24 LIMIT=580 bash bench/gpu_issue11.sh
# Later calls reuse $WORK while the machine stays warm (a fresh machine needs ckpt again).
set -uo pipefail
OUT=${OUT:-/tmp/issue11-out}
WORK=${WORK:-/tmp/issue11}
LIMIT=${LIMIT:-570}
STEPS=${STEPS:-tiny,shapes,ckpt,ort,portable,baselines,plugins}
LAYERS=${LAYERS:-24}
SHAPE_LAYERS=${SHAPE_LAYERS:-2}
SHAPE_LOWERINGS=${SHAPE_LOWERINGS:-auto,dense,gather,fused}
SHAPE_PROMPTS=${SHAPE_PROMPTS:-128,2048}
GATHER_PROMPTS=${GATHER_PROMPTS:-128}
REPRO_TOKENS=${REPRO_TOKENS:-4,9,128,2048,16384}           # 16384 = batch 8 x prompt 2048
REPRO_CASES=${REPRO_CASES:-1x4,1x9,1x128,1x2048,8x128,8x2048}  # BATCHxPROMPT prefills of the auto build
PORTABLE_LOWERING=${PORTABLE_LOWERING:-fused}
BATCHES=${BATCHES:-1,8}
PROMPTS=${PROMPTS:-128,2048}
NEW=${NEW:-128}
JOBS=${JOBS:-4}
TINY_FAMILIES=${TINY_FAMILIES:-}      # default: every registered family
TINY_DTYPES=${TINY_DTYPES:-fp16,fp32}  # ORT's CUDA GroupQueryAttention has no fp32 kernel: fp32 ort-form builds are refused there
KEEP=${KEEP:-0}
GRAPHS=${GRAPHS:-on,off}  # ort form: bench with CUDA graphs on, and with --no-cuda-graph
MOE_KERNELS=${MOE_KERNELS:-ours,ort}  # ort form, CUDA graphs on: MoE nodes on our kernels (runtime/ort_kernels.py), and on ORT's MoE
BACKEND=${BACKEND:-ort-cuda}  # ort: a CPU smoke test of this script (tiny models, LAYERS=1)
LOG=issue11.log
source "$(dirname "$0")/gpu_common.sh"

python3 -c 'import torch, onnxruntime as o, transformers; print("torch", torch.__version__, "ort", o.__version__, o.get_available_providers(), "transformers", transformers.__version__, torch.cuda.get_device_name())'
git log --oneline -1 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1

if has tiny; then
  step "tiny families: build --form auto ($TINY_DTYPES), verify --backend $BACKEND ($JOBS at a time)"
  mkdir -p "$WORK/tiny"
  families=${TINY_FAMILIES:-$(python3 -m moe_compile.cli families | awk '{print $1}' | paste -sd,)}
  export DEADLINE=$(( $(date +%s) + $(left) - 30 )) TINY_WORK=$WORK/tiny BACKEND
  for dtype in ${TINY_DTYPES//,/ }; do for family in ${families//,/ }; do echo "$family $dtype"; done; done \
    | xargs -P "$JOBS" -L 1 sh -c 't=$(( DEADLINE - $(date +%s) )); [ "$t" -gt 20 ] || { echo "{\"build\": \"$0-$1\", \"error\": \"time\"}"; exit 0; }
        timeout "$t" python3 bench/bench_gpu.py tiny --backend "$BACKEND" --work "$TINY_WORK" "$0" "$1" 2>/dev/null | grep "^{\"build\""' \
    | tee "$OUT/tiny.json"
  echo "PASS: $(grep -c '"PASS"' "$OUT/tiny.json") of $(wc -l < "$OUT/tiny.json")"
fi

if has shapes; then
  step "real shapes: A2.7B config, $SHAPE_LAYERS layers; portable builds $SHAPE_LOWERINGS"
  S=$WORK/shape-ckpt
  [ -f "$S/config.json" ] || within 60 python3 bench/bench_gpu.py checkpoint "$S" --layers "$SHAPE_LAYERS"
  t=$(( $(left) - 200 )); [ "$t" -gt 20 ] || t=20  # a negative timeout would fail every build at once
  echo "$SHAPE_LOWERINGS" | tr ',' '\n' | xargs -P 2 -I{} sh -c "timeout $t python3 bench/bench_gpu.py build $S \
    $WORK/shape-{} --form portable --lowering {} --no-torch-program --json $WORK/shape-build-{}.json > $WORK/shape-build-{}.log 2>&1; \
    grep -E '^error|^built' $WORK/shape-build-{}.log"
  : > "$OUT/shapes.json"
  for lowering in ${SHAPE_LOWERINGS//,/ }; do
    [ -f "$WORK/shape-$lowering/manifest.json" ] || { echo "no shape-$lowering build"; continue; }
    lens=$SHAPE_PROMPTS; [ "$lowering" = gather ] && lens=$GATHER_PROMPTS
    step "shapes: $lowering at prompt $lens (parity vs transformers fp32, $BACKEND)"
    within 150 python3 bench/bench_gpu.py shapes "$WORK/shape-$lowering" "$S" --prompt-lens "$lens" --backend "$BACKEND" --json "$WORK/shape-$lowering.json" \
      > "$WORK/shape-$lowering.log" 2>&1; echo "rc=$?"; grep -E '^\{"prompt_len"' "$WORK/shape-$lowering.log" | cut -c1-400
    [ -f "$WORK/shape-$lowering.json" ] && tr -d '\n' < "$WORK/shape-$lowering.json" >> "$OUT/shapes.json" && echo >> "$OUT/shapes.json"
  done
  step "auto repro: the dense branch alone / inside If at the A2.7B shape, then the auto build's prefills"
  auto=(); [ -f "$WORK/shape-auto/manifest.json" ] && auto=(--build "$WORK/shape-auto" --cases "$REPRO_CASES")
  within 90 python3 bench/bench_gpu.py split-repro --backend "$BACKEND" --tokens "$REPRO_TOKENS" "${auto[@]}" --json "$WORK/repro.json" > "$WORK/repro.log" 2>&1; echo "rc=$?"
  grep -E '^\{"(graph|optimisation)' "$WORK/repro.log" | cut -c1-300
  [ -f "$WORK/repro.json" ] && tr -d '\n' < "$WORK/repro.json" >> "$OUT/shapes.json" && echo >> "$OUT/shapes.json"
  echo "--- with CUDA_LAUNCH_BLOCKING=1 (each kernel's launch error reported by its own node)"
  CUDA_LAUNCH_BLOCKING=1 within 30 python3 bench/bench_gpu.py split-repro --backend "$BACKEND" --tokens "$REPRO_TOKENS" "${auto[@]}" --json "$WORK/repro-blocking.json" \
    > "$WORK/repro-blocking.log" 2>&1; echo "rc=$?"
  grep -E '^\{"(graph|optimisation)' "$WORK/repro-blocking.log" | grep error | cut -c1-300
  [ -f "$WORK/repro-blocking.json" ] && tr -d '\n' < "$WORK/repro-blocking.json" >> "$OUT/shapes.json" && echo >> "$OUT/shapes.json"
  [ "$KEEP" = 1 ] || rm -rf "$WORK"/shape-{auto,dense,gather,fused}
fi

C=$WORK/ckpt
if has ckpt; then
  step "checkpoint: A2.7B config, $LAYERS layers, fp16 random, hub layout"
  if [ "$(python3 -c "import json; print(json.load(open('$C/config.json'))['num_hidden_layers'])" 2>/dev/null)" != "$LAYERS" ]; then
    rm -rf "$C"; within 60 python3 bench/bench_gpu.py checkpoint "$C" --layers "$LAYERS"
  fi
  du -sh "$C"; df -h /tmp | tail -1
fi

bench_build() {  # NAME FORM LOWERING: build, bench (graphs on, and off for the ort form), JSON lines to bench-NAME.json
  local name=$1 form=$2 lowering=$3 dir=$WORK/build-$1
  step "build $name: --form $form ${lowering:+--lowering $lowering} --dtype fp16 ($LAYERS layers)"
  [ -f "$dir/manifest.json" ] || within 240 python3 bench/bench_gpu.py build "$C" "$dir" --form "$form" ${lowering:+--lowering "$lowering"} \
    --no-torch-program --json "$WORK/build-$name.json" > "$WORK/build-$name.log" 2>&1
  grep -E '^error|^built' "$WORK/build-$name.log"; [ -f "$WORK/build-$name.json" ] && tr -d '\n ' < "$WORK/build-$name.json"; echo
  [ -f "$dir/manifest.json" ] || return 1
  : > "$OUT/bench-$name.json"
  local runs=("on ours")  # CUDA graphs, MoE kernels
  if [ "$form" = ort ]; then
    runs=(); for k in ${MOE_KERNELS//,/ }; do runs+=("on $k"); done
    for g in ${GRAPHS//,/ }; do [ "$g" = off ] && runs+=("off ${MOE_KERNELS%%,*}"); done
  fi
  for run in "${runs[@]}"; do
    local graph=${run% *} kernels=${run#* } flag=""; [ "$graph" = off ] && flag=--no-cuda-graph
    step "moe-compile bench $name --backend $BACKEND: CUDA graphs $graph, MoE kernels $kernels: batch $BATCHES x prompt $PROMPTS, $NEW new tokens"
    MOE_COMPILE_MOE_KERNELS=$([ "$kernels" = ort ] && echo ort) within 60 python3 -m moe_compile.cli bench "$dir" --backend "$BACKEND" \
      --batch "$BATCHES" --prompt-len "$PROMPTS" --new-tokens "$NEW" $flag --json > "$WORK/bench.json" 2> "$WORK/bench.err"; echo "rc=$?"; tail -3 "$WORK/bench.err"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["cuda_graph_flag"]=sys.argv[2]; print(json.dumps(r))' "$WORK/bench.json" "$graph" \
      >> "$OUT/bench-$name.json" && python3 -c 'import json,sys; from moe_compile.runtime.benchmark import table; print("\n".join(table(json.loads(open(sys.argv[1]).read().splitlines()[-1]))))' "$OUT/bench-$name.json"
  done
}

if has ort && [ -f "$C/config.json" ]; then
  if bench_build ort ort ""; then
    step "parity: ort form fp16 vs transformers fp32, 4 prompts x 64 positions (CUDA graphs on)"
    within 60 python3 bench/bench_gpu.py parity "$WORK/build-ort" "$C" --backend "$BACKEND" --json "$OUT/parity.json" > "$WORK/parity.log" 2>&1; echo "rc=$?"
    tail -3 "$WORK/parity.log"
    step "per-kernel GPU time of a batch-1 decode step (CUPTI), CUDA graphs on"
    within 30 python3 bench/ort_step_kernels.py "$WORK/build-ort" on > "$OUT/kernels.txt" 2> "$WORK/kernels.err"; echo "rc=$?"
    head -12 "$OUT/kernels.txt"
    step "ORT profile of the ort form (CUDA graphs off)"
    within 30 python3 bench/bench_gpu.py profile "$WORK/build-ort" --backend "$BACKEND" --json "$WORK/profile.json" > "$WORK/profile.log" 2>&1; echo "rc=$?"
    [ -f "$WORK/profile.json" ] && python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); [print(k, round(v["run_us"]/v["runs"]), "us/run", v["share"]) for k, v in p.items()]' "$WORK/profile.json"
  fi
  [ "$KEEP" = 1 ] || rm -rf "$WORK/build-ort"
fi

if has portable && [ -f "$C/config.json" ]; then
  bench_build portable portable "$PORTABLE_LOWERING"
  [ "$KEEP" = 1 ] || rm -rf "$WORK/build-portable"
fi

if has baselines && [ -f "$C/config.json" ]; then
  step "transformers baselines: eager (batched_mm, grouped_mm), StaticCache + torch.compile"
  within 20 python3 bench/bench_gpu.py baselines "$C" --batch "$BATCHES" --prompt-len "$PROMPTS" --new-tokens "$NEW" \
    --impls "${IMPLS:-static-compile,grouped_mm,batched_mm}" --budget-s $(( $(left) - 60 )) --json "$OUT/baselines.json"
fi

if has plugins; then
  step "fused MoE kernels: build (sm_90) and tests/plugins"
  if [ -z "${MOE_COMPILE_KERNELS_LIB:-}" ]; then
    within 200 python3 -m moe_compile.plugins.build --arch 90 --jobs 16 > "$WORK/kernels-build.log" 2>&1 || tail -5 "$WORK/kernels-build.log"
  fi
  within 10 python3 -m pytest -q -p no:logging -x tests/plugins 2>&1 | tail -15
fi
step "done"
