# Shared by the bench/gpu_*.sh scripts (sourced after they set OUT, WORK, LIMIT, STEPS and LOG): output
# teed to $OUT/$LOG, the carried onnxruntime-gpu on the path, and the step helpers.
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/devsite:$PWD TOKENIZERS_PARALLELISM=false
left() { echo $((LIMIT - SECONDS)); }
step() { echo; echo "=== [$(date -u +%H:%M:%S) t=${SECONDS}s] $*"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
# run CMD with what is left minus a margin (seconds); "skipped" once less than 20 s would be left
within() { local margin=$1; shift; local t=$(( $(left) - margin )); [ "$t" -gt 20 ] || { echo "skipped (time): $*"; return 124; }; timeout "$t" "$@"; }
