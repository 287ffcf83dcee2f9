"""Host memory of a build by stage: `moe-compile build ARGS` with each stage's end reporting the process's
resident set and its peak so far (/proc/self/status VmRSS, VmHWM), on stderr as `[mem] after STAGE: ...`.

    python bench/build_memory.py CHECKPOINT -o OUT [build flags...]

docs/QUANTIZATION.md's stage figures (a 2-layer A2.7B-config checkpoint from `bench/bench_gpu.py checkpoint
CKPT --layers 2`) come from `python bench/build_memory.py CKPT -o OUT --form ort --dtype fp16 --backend onnx
[--quantize int4]`.
"""

import contextlib
import importlib
import sys

build_module = importlib.import_module("moe_compile.build")  # the module (the package exports the function)


def memory() -> str:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    gb = lambda key: int(status[key].split()[0]) / 2**20
    return f"RSS {gb('VmRSS'):.2f} GB, peak {gb('VmHWM'):.2f} GB"


stage = build_module._Stages.__call__


@contextlib.contextmanager
def stage_with_memory(self, name):
    with stage(self, name):
        yield
    print(f"[mem] after {name}: {memory()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    build_module._Stages.__call__ = stage_with_memory
    from moe_compile.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
