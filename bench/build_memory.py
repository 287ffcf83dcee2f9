"""Host memory of a build by stage: `moe-compile build ARGS` with each stage's end reporting the process's
resident set (anonymous memory and file-backed pages: the checkpoint's mapped safetensors) and its peak so far
(/proc/self/status VmRSS, RssAnon, RssFile, VmHWM), and the peak of the anonymous part (sampled: the kernel keeps
none), on stderr as `[mem] after STAGE: ...`; the check stage's two halves (the torch program's reference logits,
then ONNX Runtime's session) each with the anonymous peak within it. File-backed pages are the page cache's: the
kernel drops them under pressure and reads them again, so the anonymous peak is what a build needs the machine to hold.

    python bench/build_memory.py CHECKPOINT -o OUT [build flags...]

docs/QUANTIZATION.md's stage figures (a 2-layer A2.7B-config checkpoint from `bench/bench_gpu.py checkpoint
CKPT --layers 2`) come from `python bench/build_memory.py CKPT -o OUT --form ort --dtype fp16 --backend onnx
[--quantize int4]`.
"""

import contextlib
import importlib
import sys
import threading
import time

build_module = importlib.import_module("moe_compile.build")  # the module (the package exports the function)


def status_gb() -> dict[str, float]:
    return {key: int(value.split()[0]) / 2**20 for key, value in (line.split(":", 1) for line in open("/proc/self/status"))
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


peak_anonymous = 0.0  # the kernel keeps no peak of RssAnon: a thread samples it
part_peak = 0.0  # the same since the start of a marked call (the check's two halves)
peaks = threading.Lock()  # a reset of part_peak between the sampler's read and write would be undone


def sample_anonymous() -> None:
    global peak_anonymous, part_peak
    while True:
        now = status_gb()["RssAnon"]
        with peaks:
            peak_anonymous, part_peak = max(peak_anonymous, now), max(part_peak, now)
        time.sleep(0.02)


def memory() -> str:
    gb = status_gb()
    return (f"RSS {gb['VmRSS']:.2f} GB (anonymous {gb['RssAnon']:.2f}, file-backed {gb['RssFile']:.2f}), "
            f"peak {gb['VmHWM']:.2f} GB, anonymous peak {max(peak_anonymous, gb['RssAnon']):.2f} GB (sampled every 20 ms)")


stage = build_module._Stages.__call__


@contextlib.contextmanager
def stage_with_memory(self, name):
    with stage(self, name):
        yield
    print(f"[mem] after {name}: {memory()}", file=sys.stderr, flush=True)


def marked(function, name):
    """`function` with the memory printed after it, and the anonymous peak within it."""
    def run(*args, **kwargs):
        global part_peak
        with peaks:
            part_peak = status_gb()["RssAnon"]
        result = function(*args, **kwargs)
        within = max(part_peak, status_gb()["RssAnon"])
        print(f"[mem] after {name}: {memory()}; anonymous peak within it {within:.2f} GB", file=sys.stderr, flush=True)
        return result
    return run


if __name__ == "__main__":
    build_module._Stages.__call__ = stage_with_memory
    # the check's halves: the torch program's reference logits (its weights still held), then ONNX Runtime's session
    build_module.check_reference = marked(build_module.check_reference, "check_reference")
    build_module.check_build = marked(build_module.check_build, "check_build")
    threading.Thread(target=sample_anonymous, daemon=True).start()
    from moe_compile.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
