"""On a CUDA machine: the `fused` build of each tiny family against transformers, run by
(a) ONNX Runtime's CUDA provider (com.microsoft:MoE on CUDA, checked in ORT's own profile) and
(b) the torch backend on CUDA, where `moe_compile::fused_moe` dispatches to our kernels
(checked in the torch profiler's kernel list).

    PYTHONPATH=. python3 bench/gpu_fused_parity.py --out /tmp/fused-parity [--json result.json]

Builds are made in --out unless already there (`--build-only` makes them on another machine:
capture of some families needs a newer torch than the GPU machine's 2.11). Per family: `moe-compile verify` (logits of an 11-token prompt vs transformers fp32 eager, and 32
greedy tokens) on each backend, and three prompts of different lengths in one batch, each
compared with transformers' own greedy generation.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import sys
import time
from pathlib import Path

import torch

from moe_compile import build, load
from moe_compile.models import FAMILIES
from moe_compile.models.embedded import write_checkpoint
from moe_compile.models.loading import load_model
from moe_compile.runtime.ort_backend import OrtCudaBackend
from moe_compile.verify import verify

VARIANTS = {name: FAMILIES[name].tiny_config for name in ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")}
VARIANTS["qwen2_moe-renorm"] = dict(FAMILIES["qwen2_moe"].tiny_config, norm_topk_prob=True, mlp_only_layers=[],
                                    decoder_sparse_step=2)
PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12], [9, 9, 64, 200, 31]]


class OrtCudaProfiled(OrtCudaBackend):
    """`ort-cuda`, profiled, so that the MoE nodes' provider can be read back."""

    name = "ort-cuda-profiled"
    profile_dir: Path | None = None

    def session_options(self, options) -> None:
        if self.profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(self.profile_dir / "ort")


def moe_providers(profile_dir: Path) -> set[str]:
    """Providers ORT's profile reports for the MoE nodes (written when the session is released)."""
    gc.collect()
    found = set()
    for path in glob.glob(str(profile_dir / "ort*.json")):
        for event in json.load(open(path)):
            args = event.get("args", {})
            if args.get("op_name") == "MoE":
                found.add(args.get("provider"))
    return found


def our_kernels_ran(out: Path) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    model = load(out, "torch-cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate([PROMPTS[0]], max_new_tokens=2)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(k in n for k in ("decode_gate_up", "grouped_gemm", "route")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fused-parity")
    parser.add_argument("--json", default=None)
    parser.add_argument("--build-only", action="store_true",
                        help="only build into --out (e.g. where torch.export captures these models), to carry to the GPU")
    args = parser.parse_args(argv)
    root = Path(args.out)
    results, failures = [], 0
    for variant, config in VARIANTS.items():
        checkpoint, out = root / f"ckpt-{variant}", root / f"{variant}-fused"
        start = time.perf_counter()
        if not (out / "manifest.json").is_file():  # --build-only on another machine may have made it
            write_checkpoint(config, checkpoint)
            build(str(checkpoint), out, lowering="fused", max_batch=4, max_seq=128, progress=False)
        row = {"variant": variant, "build_s": round(time.perf_counter() - start, 1)}
        if args.build_only:
            continue
        reference = load_model(checkpoint)
        expected = []
        for prompt in PROMPTS:
            with torch.no_grad():
                tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
            expected.append(tokens.tolist())
        for backend in ("ort-cuda-profiled", "torch-cuda"):
            profile_dir = root / f"profile-{variant}"
            profile_dir.mkdir(parents=True, exist_ok=True)
            OrtCudaProfiled.profile_dir = profile_dir
            try:
                report = verify(out, model=str(checkpoint), new_tokens=32, backend=backend)
                batch = [g.token_ids for g in load(out, backend).generate(PROMPTS, max_new_tokens=32)]
            except Exception as exc:  # noqa: BLE001  (recorded per backend; the other one still runs)
                row[backend] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                failures += 1
                continue
            ok = report.greedy_match and report.relative_error <= 1e-4 and batch == expected
            row[backend] = {"relative_error": report.relative_error, "greedy_match": report.greedy_match,
                            "batch_prompts_match": batch == expected, "ok": ok}
            if backend == "ort-cuda-profiled":
                row[backend]["moe_providers"] = sorted(moe_providers(profile_dir))
                ok = ok and row[backend]["moe_providers"] == ["CUDAExecutionProvider"]
            else:
                row[backend]["our_kernels"] = our_kernels_ran(out)
                ok = ok and bool(row[backend]["our_kernels"])
            row[backend]["ok"] = ok
            failures += not ok
        print(json.dumps(row), flush=True)
        results.append(row)
    print(f"{len(results)} families, {failures} failing backend runs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
