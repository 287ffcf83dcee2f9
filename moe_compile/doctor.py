"""`moe-compile doctor`: one screen on what this machine has (versions, ONNX Runtime providers, GPU) and
which backends and build forms it can run, with the reason where it cannot."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
from importlib import metadata

import torch
from packaging.version import Version

from .errors import MoeCompileError
from .runtime.ort_install import EXTRAS, INSTALL, conflict, distributions, import_onnxruntime
from .trt import compat

CUDA = "CUDAExecutionProvider"
WIDTH = 14  # the first column


def report() -> list[str]:
    ort, ort_lines = _onnxruntime()
    trt, trt_lines = _tensorrt()
    gpu = _gpu()
    lines = [f"moe-compile {_version('moe-compile')}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
             _row("torch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (a CPU build)")),
             _row("transformers", _version("transformers")),
             _row("onnx", _version("onnx")),
             *ort_lines, *trt_lines,
             _row("GPU", f"{gpu[0]}, compute capability {gpu[1]}" if gpu else "none found"),
             _row("CUDA kernels", f"ort-cuda: {_cuda_kernels()}")]
    why_not = _backends(ort, trt, gpu)
    lines += ["", _row("backend", "(moe-compile run --backend)")]
    lines += [_row(name, "yes" if why is None else f"no: {why}") for name, why in why_not.items()]
    lines += ["", _row("form", "(moe-compile build --form)")]
    lines += [_row(form, text) for form, text in _forms(ort, trt, why_not).items()]
    return lines


def _row(name: str, text: str) -> str:
    return f"{name:{WIDTH}} {text}"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _onnxruntime():
    """(the module or None, its lines: version, distribution, providers, or what to install)."""
    try:
        ort = import_onnxruntime()
    except MoeCompileError as exc:
        return None, [_row("onnxruntime", str(exc))]
    found = distributions()
    where = ", ".join(f"{d} (the [{EXTRAS[d]}] extra)" if d in EXTRAS else d for d in found)
    lines = [_row("onnxruntime", f"{ort.__version__} from {where or 'no installed distribution'}"),
             _row("providers", ", ".join(ort.get_available_providers()))]
    if len(found) > 1:
        lines.append(_row("", f"warning: {conflict(found)}"))
    return ort, lines


def _tensorrt():
    """(the TensorRT a build would use or None, one line per package)."""
    lines, chosen = [], None
    for package in compat.PACKAGES:
        if importlib.util.find_spec(package) is None:
            lines.append(_row(package, f"not installed ({compat.INSTALL[package]}, {compat.GPUS[package]})"))
            continue
        try:
            t = compat.load(package)
        except compat.TensorRTMissing as exc:
            lines.append(_row(package, str(exc)))
            continue
        chosen = chosen or t
        runs = f"compute capability {', '.join(t.capabilities())}" if t.rtx else "the GPU model that built them"
        lines.append(_row(package, f"{t.version} (builds engines without a GPU; runs them on {runs})"))
    return chosen, lines


def _gpu() -> tuple[str, str] | None:
    """(name, compute capability) of the first GPU: torch's view where it is a CUDA build, else nvidia-smi's
    (ort-cuda needs no CUDA torch)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return torch.cuda.get_device_name(), f"{major}.{minor}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    result = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    name, capability = result.stdout.splitlines()[0].rsplit(",", 1)
    return name.strip(), capability.strip()


def _backends(ort, trt, gpu) -> dict[str, str | None]:
    """Backend name -> why it cannot run here (None: it can)."""
    no_ort = f"no onnxruntime ({INSTALL})"
    torch_gpu = None if torch.cuda.is_available() else (
        "torch sees no CUDA GPU" + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"))
    return {
        "ort": no_ort if ort is None else None,
        "ort-cuda": _ort_cuda(ort, gpu) if ort else no_ort,
        "torch": None,
        "torch-cuda": torch_gpu,
        "trt": _trt(trt, gpu, torch_gpu),
    }


def _ort_cuda(ort, gpu) -> str | None:
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime has no {CUDA} (pip uninstall -y onnxruntime && pip install 'moe-compile[gpu]')"
    return None if gpu else "no CUDA GPU"


def _cuda_kernels() -> str:
    """Which kernels run ort-cuda's MoE nodes, a quantized build's MatMulNBits and the attention's decode step
    (runtime/ort_kernels.py); never builds anything."""
    from .runtime.ort_kernels import library

    path, why = library(build=False)
    if path:
        return f"moe_compile's for MoE, quantized MatMul and decode attention ({path.name})"
    return f"onnxruntime's ({why})"


def _trt(trt, gpu, torch_gpu: str | None) -> str | None:
    if trt is None:
        return f"no TensorRT ({compat.INSTALL['tensorrt']} or {compat.INSTALL['tensorrt_rtx']})"
    if torch_gpu:  # the backend keeps its buffers in torch CUDA tensors
        return torch_gpu
    if trt.rtx and gpu[1] not in trt.capabilities():
        return f"tensorrt_rtx runs engines on compute capability {', '.join(trt.capabilities())}, this GPU is {gpu[1]}"
    return None


def _forms(ort, trt, why_not: dict[str, str | None]) -> dict[str, str]:
    """Each ONNX form: whether a build of it can be made here (the build's check runs it on ONNX Runtime)
    and which of the backends that read it run here."""
    from .build import FORMS
    from .runtime.backend import BACKENDS
    from .runtime.backend import FORMS as VARIANTS
    from .runtime.ort_backend import FUSED_CPU_MIN

    rows = {}
    for form in (f for f in FORMS if f != "auto"):
        readers = [name for name, cls in BACKENDS.items() if cls.form == form or (name, form) in VARIANTS]
        runs = [name for name in readers if why_not[name] is None]
        notes = []
        if form == "ort" and "ort" in runs and Version(ort.__version__) < Version(FUSED_CPU_MIN):
            runs.remove("ort")  # its MoE node is com.microsoft:MoE
            notes.append(f"not ort: onnxruntime {ort.__version__}'s CPU MoE kernel is wrong before {FUSED_CPU_MIN}")
        if form == "portable":
            notes.append(f"engine.plan by {trt.describe()}" if trt else "no engine.plan (no TensorRT)")
        builds = "builds here" if ort else "cannot build here (the build's check runs onnxruntime)"
        where = f"runs here on {', '.join(runs)}" if runs else f"none of {', '.join(readers)} runs here"
        rows[form] = "; ".join([builds, where, *notes])
    return rows
