#!/usr/bin/env bash
# Device: build the sweep's libraries, time them, run the quantized kernel tests on the default setting.
set -uo pipefail
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv
S=/tmp/sweep
python bench/sweep_quant_decode1.py build $S "$@" > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
python bench/sweep_quant_decode1.py time $(for a in "$@"; do echo $S/${a%%=*}; done) 2>&1 | tee $OUT/sweep.txt
