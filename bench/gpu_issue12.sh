#!/usr/bin/env bash
# Issue 12 on the H200 (device tool, repository root): fp16 against int8 and int4 ort-form builds of the
# A2.7B config ($LAYERS layers, random weights, bench/bench_gpu.py checkpoint) on ort-cuda with CUDA graphs:
# batch-1 decode tok/s (the target: int4 >= 1.6x fp16), prefill, device memory (bench's peak), file size,
# build time and peak host RSS (the quantizer streams: < 1.2x the fp16 weights), and each quantized build's
# agreement with the fp16 build's greedy tokens. Steps (STEPS, comma-separated) run in order, each cut off
# by the time left (LIMIT seconds for the whole command); results land under $OUT (issue12.log, one JSON
# line per build in builds.json and per bench in bench.json).
#
#   ckpt     A2.7B config with $LAYERS layers, fp16 random, hub layout (reused while the machine is warm)
#   fp16     moe-compile build --form ort --dtype fp16, then bench
#   int8     the same with --quantize int8 --block-size $BLOCK
#   int4     the same with --quantize int4 --block-size $BLOCK
#   int4-head the same with --quantize int4 --quantize-lm-head (the LM head as MatMulNBits too)
#   int4-ort the int4 build's bench again with ONNX Runtime's QMoE (MOE_COMPILE_MOE_KERNELS=ort): same-run comparison
#   int4-serial the int4 build's bench again with no launch started early (MOE_COMPILE_PROGRAMMATIC_LAUNCH=0: the
#            MoE's down, the attention's two, the quantized projections): what the programmatic launches give a step
#   int4-ortmm the int4 build's bench again with ONNX Runtime's MatMulNBits for the projections
#            (MOE_COMPILE_MATMUL_KERNELS=ort): what our quantized matmul gives a step
#   NAME-attn (fp16-attn, int4-attn, int4-head-attn) build NAME's bench again with ONNX Runtime's attention
#            (MOE_COMPILE_ATTENTION_KERNELS=ort) twice, then with ours (the default) once more: A B B A with NAME's
#            own bench, so that the order the runs come in (the tenth run: up to ~10% between neighbours) falls on
#            both alike
#   NAME-ab  (fp16-ab, int4-head-ab, ...) build NAME's bench again under the settings in $AB (default: the router
#            MatMul and the skip-norms on ONNX Runtime, MOE_COMPILE_ROUTER_KERNELS=ort MOE_COMPILE_NORM_KERNELS=ort)
#            twice, then without them once more: A B B A with NAME's own bench, as NAME-attn
#   NAME-old (fp16-old, int4-head-old, ...) build NAME's bench again with the runtime of another commit: the
#            moe_compile package exported to $OLD (git archive COMMIT moe_compile | tar -x -C .dev/old), the same
#            kernel libraries: what a runtime change gives a step, in the same lease
#   profile  bench/ort_step_kernels.py on each $PROFILE build (comma-separated, default int4; CUPTI: GPU µs a decode
#            step by kernel, and the step's critical path by kernel)
#   parity   verify --backend ort-cuda of each quantized build (top-1 agreement with fp32 transformers)
# MEMORY lists builds made through bench/build_memory.py (the same build, with each stage's host memory and the
# anonymous peak in its log and builds.json): the quantizer's memory at 24 layers, which the CPU machine cannot hold.
#
# Expects onnxruntime-gpu in /tmp/devsite (../shared/tools/device-wheels: five calls first; pydantic as cp312
# wheels) and the kernel libraries for sm_90 (MOE_COMPILE_KERNELS_LIB, MOE_COMPILE_ORT_OPS_LIB). The eighth run
# (docs/BENCHMARKS.md) split the steps over two calls of one lease (391 s and 224 s), each build taking ~100-130 s:
#   STEPS=ckpt,fp16,int4 KEEP=int4 LIMIT=555 bash bench/gpu_issue12.sh
#   STEPS=ckpt,int4-head,int4-ortmm,profile KEEP=int4,int4-head LIMIT=400 bash bench/gpu_issue12.sh
# (disk: the checkpoint, int4 and int4-head builds leave ~28 GB, too little for the fp16 build beside them.)
# Builds are kept in $WORK (disk: 64 GB; the checkpoint is ~27 GB, the fp16 build ~29): KEEP lists the builds to keep,
# the others are deleted right after their bench. With the checkpoint in /dev/shm (CKPT) the disk holds the fp16 and
# the int4 builds at once, so that their benches can alternate (A B B A).
set -uo pipefail
OUT=${OUT:-/tmp/issue12-out}
WORK=${WORK:-/tmp/issue12}
LIMIT=${LIMIT:-570}
STEPS=${STEPS:-ckpt,fp16,int8,int4,parity}
LAYERS=${LAYERS:-24}
BLOCK=${BLOCK:-32}
BATCHES=${BATCHES:-1}
PROMPTS=${PROMPTS:-128}
NEW=${NEW:-128}
KEEP=${KEEP:-fp16,int8,int4}
PROFILE=${PROFILE:-int4}
AB=${AB:-MOE_COMPILE_ROUTER_KERNELS=ort MOE_COMPILE_NORM_KERNELS=ort}
OLD=${OLD:-$PWD/.dev/old}
BACKEND=${BACKEND:-ort-cuda}  # ort: a CPU smoke test of this script (LAYERS=1)
LOG=issue12.log
source "$(dirname "$0")/gpu_common.sh"
python3 -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__)'

C=${CKPT:-$WORK/ckpt}  # CKPT=/dev/shm/ckpt: the checkpoint in memory, where the disk cannot hold it beside the builds
if has ckpt; then
  step "checkpoint: A2.7B config, $LAYERS layers, fp16 random, hub layout"
  if [ "$(python3 -c "import json; print(json.load(open('$C/config.json'))['num_hidden_layers'])" 2>/dev/null)" != "$LAYERS" ]; then
    rm -rf "$C"; within 60 python3 bench/bench_gpu.py checkpoint "$C" --layers "$LAYERS"
  fi
  du -sh "$C"; df -h /tmp | tail -1
fi

build_bench() {  # NAME [build flags...]: build (time, peak RSS, file sizes), then bench on $BACKEND
  local name=$1 dir=$WORK/build-$1; shift
  step "build $name: --form ort --dtype fp16 $* ($LAYERS layers)"
  if [ ! -f "$dir/manifest.json" ]; then
    local builder=(-m moe_compile.cli build)
    [[ ",${MEMORY:-}," == *",$name,"* ]] && builder=(bench/build_memory.py)
    within 60 /usr/bin/time -v python3 "${builder[@]}" "$C" -o "$dir" --form ort --dtype fp16 --backend onnx "$@" \
      > "$WORK/build-$name.log" 2>&1
    grep -E '^error|^built|Maximum resident|^\[mem\]' "$WORK/build-$name.log"
  fi
  [ -f "$dir/manifest.json" ] || return 1
  python3 - "$dir" "$name" "$WORK/build-$name.log" >> "$OUT/builds.json" <<'EOF'
import json, re, sys
from pathlib import Path
out, name, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
m = json.loads((out / "manifest.json").read_text())
rss = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text()) if log.exists() else []
built = re.findall(r"built .* in ([\d.]+) s", log.read_text()) if log.exists() else []
anonymous = re.findall(r"anonymous peak ([\d.]+) GB", log.read_text()) if log.exists() else []  # MEMORY builds
q = m.get("quantization") or {}
print(json.dumps({"name": name, "files": {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()},
                  "peak_rss_gb": int(rss[0]) / 2**20 if rss else None, "build_s": float(built[0]) if built else None,
                  "anonymous_peak_gb": max(map(float, anonymous)) if anonymous else None,
                  "weights_before": sum(r["before"] for r in q.get("bytes", {}).values()) or None,
                  "weights_after": sum(r["after"] for r in q.get("bytes", {}).values()) or None,
                  "ops": q.get("ops"), "unquantized": q.get("unquantized")}))
EOF
  tail -1 "$OUT/builds.json"
  step "moe-compile bench $name --backend $BACKEND (CUDA graphs on): batch $BATCHES x prompt $PROMPTS, $NEW new tokens"
  bench_as "$name" "$dir"
  if has "$name-attn"; then ab "$name" "$dir" -ortattn MOE_COMPILE_ATTENTION_KERNELS=ort; fi
  if has "$name-ab"; then ab "$name" "$dir" -A $AB; fi
  if has "$name-old"; then  # python -m puts the working directory first on the path: run from $OLD
    step "moe-compile bench $name with the runtime in $OLD"
    (cd "$OLD" && export PYTHONPATH=/tmp/devsite:$OLD && bench_as "$name-old" "$dir")
  fi
  [[ ",$KEEP," == *",$name,"* ]] || rm -rf "$dir"
}

record_bench() {  # NAME: $WORK/bench.json as one line of $OUT/bench.json, and its table
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["name"]=sys.argv[2]; print(json.dumps(r))' "$WORK/bench.json" "$1" \
    >> "$OUT/bench.json" && python3 -c 'import json,sys; from moe_compile.runtime.benchmark import table; print("\n".join(table(json.loads(open(sys.argv[1]).read().splitlines()[-1]))))' "$OUT/bench.json"
}

bench_as() {  # LABEL DIR [VAR=VALUE...]: one bench of the build in DIR under those settings, recorded as LABEL
  local label=$1 dir=$2; shift 2
  within 30 env "$@" python3 -m moe_compile.cli bench "$dir" --backend "$BACKEND" --batch "$BATCHES" \
    --prompt-len "$PROMPTS" --new-tokens "$NEW" --json > "$WORK/bench.json" 2> "$WORK/bench.err"
  echo "rc=$?"; tail -2 "$WORK/bench.err"; record_bench "$label"
}

ab() {  # NAME DIR SUFFIX VAR=VALUE...: NAME's bench under the settings twice (as NAME-SUFFIX), then the defaults once
  local name=$1 dir=$2 suffix=$3; shift 3
  for _ in 1 2; do step "moe-compile bench $name with $*"; bench_as "$name$suffix" "$dir" "$@"; done
  step "moe-compile bench $name with the defaults"; bench_as "$name" "$dir"
}

has fp16 && build_bench fp16
has int8 && build_bench int8 --quantize int8 --block-size "$BLOCK"
has int4 && build_bench int4 --quantize int4 --block-size "$BLOCK"
has int4-head && build_bench int4-head --quantize int4 --block-size "$BLOCK" --quantize-lm-head

bench_again() {  # NAME ENV=VALUE: the int4 build's bench again under one environment setting
  [ -f "$WORK/build-int4/manifest.json" ] || return 1
  step "moe-compile bench int4 --backend $BACKEND with $2"
  bench_as "$1" "$WORK/build-int4" "$2"
}
has int4-ort && bench_again int4-ort MOE_COMPILE_MOE_KERNELS=ort
has int4-serial && bench_again int4-serial MOE_COMPILE_PROGRAMMATIC_LAUNCH=0
has int4-ortmm && bench_again int4-ortmm MOE_COMPILE_MATMUL_KERNELS=ort

if has profile; then
  for name in ${PROFILE//,/ }; do
    [ -f "$WORK/build-$name/manifest.json" ] || continue
    step "bench/ort_step_kernels.py $name on (CUDA graphs): GPU µs a decode step by kernel, and its critical path"
    within 30 python3 bench/ort_step_kernels.py "$WORK/build-$name" on > "$OUT/profile-$name.txt" 2>&1; echo "rc=$?"
    head -70 "$OUT/profile-$name.txt"
  done
fi

if has parity; then
  for name in int8 int4; do
    [ -f "$WORK/build-$name/manifest.json" ] || continue
    step "verify $name --backend $BACKEND (top-1 agreement with fp32 transformers; the manifest's threshold)"
    within 30 python3 -m moe_compile.cli verify "$WORK/build-$name" --model "$C" --backend "$BACKEND" --new-tokens 64; echo "rc=$?"
  done
fi
step "done"
