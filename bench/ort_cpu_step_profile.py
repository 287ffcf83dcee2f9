"""Where a CPU decode step of an ort-form build goes: ONNX Runtime's profiler over the decode runs that follow a
128-token prompt, ms a step by op type, the step's own time (`model_run`) and what falls between the nodes; with
--prefill, the same for the 128-token prompt's run.

    python bench/ort_cpu_step_profile.py BUILD [--steps 16] [--prefill]

The profiler lengthens a step (an event per node): read the shares, and take the speed from `moe-compile bench`.
The first session loads and warms the build; the second one's events are counted.
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

import moe_compile
from moe_compile.runtime.ort_inplace import OrtInplaceBackend


class ProfiledOrt(OrtInplaceBackend):
    """The ort-form CPU backend with ONNX Runtime's profiler on (registered for ("ort", "ort") while this runs)."""

    name, form = "ort", "ort"
    prefix = ""

    def session_options(self, options) -> None:
        options.enable_profiling = True
        options.profile_file_prefix = self.prefix


def profile(build: str, steps: int, folder: Path, prefill: bool = False) -> dict:
    ProfiledOrt.prefix = str(folder / "profile")
    for _ in range(2):
        model = moe_compile.load(build, "ort")
        # the benchmark model's 32000 ids, the same prompt as before; fewer where the vocabulary is smaller
        prompt = np.random.default_rng(0).integers(3, min(32000, model.manifest.vocab_size), 128).tolist()
        model.generate([prompt], max_new_tokens=1 if prefill else steps + 1, eos_token_id=[])
        path = model.backend.session.end_profiling()
    events = json.loads(Path(path).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    runs = runs[:1] if prefill else runs[1:]  # the first: the prompt
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in spans):
            by_op[e["args"]["op_name"]] += e["dur"]
    ms = lambda us: us / len(runs) / 1e3
    step = ms(sum(r["dur"] for r in runs))
    return {"steps": len(runs), "step_ms": step, "outside_nodes_ms": step - ms(sum(by_op.values())),
            "ops_ms": {op: ms(us) for op, us in by_op.most_common()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", action="store_true", help="the prompt's run instead of the decode steps")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = profile(args.build, args.steps, Path(folder), args.prefill)
    what = "the prompt's run" if args.prefill else f"{result['steps']} decode steps"
    print(f"{what}: {result['step_ms']:.2f} ms a step (model_run), "
          f"{result['outside_nodes_ms']:.2f} between the nodes")
    for op, value in result["ops_ms"].items():
        print(f"  {op:34s} {value:6.2f} ms")


if __name__ == "__main__":
    main()
