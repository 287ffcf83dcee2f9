"""One compat layer over the two TensorRT Python packages.

`tensorrt` is full TensorRT (datacenter GPUs; its engines are tied to the GPU model that built them).
`tensorrt_rtx` is TensorRT for RTX (consumer/workstation GPUs; it builds ahead of time without a GPU
and compiles kernels just in time on the GPU that runs the engine). Their Python APIs are the same
where moe_compile uses them; the few places where they differ are the members of `TensorRT` below,
and nothing else in moe_compile imports either package.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from types import ModuleType

from ..errors import ArtifactError, MoeCompileError

PACKAGES = ("tensorrt", "tensorrt_rtx")  # preference order when both are installed
INSTALL = {"tensorrt": "pip install 'moe-compile[tensorrt]'", "tensorrt_rtx": "pip install 'moe-compile[tensorrt-rtx]'"}
GPUS = {"tensorrt": "datacenter GPUs", "tensorrt_rtx": "RTX GPUs"}


class TensorRTMissing(MoeCompileError):
    """No usable TensorRT Python package (or not the one an engine was built with)."""


class CannotRun(MoeCompileError):
    """The engine cannot run here: no suitable GPU, or another TensorRT version or GPU built it."""


def find() -> str | None:
    """The TensorRT package a build would use, without importing it (importing costs seconds)."""
    return next((p for p in PACKAGES if importlib.util.find_spec(p) is not None), None)


def load(package: str | None = None) -> TensorRT:
    """Import `package` (default: the preferred installed one), naming what to install if it is absent."""
    package = package or find()
    if package is None:
        raise TensorRTMissing(
            f"no TensorRT is installed: {INSTALL['tensorrt']} (datacenter GPUs) or {INSTALL['tensorrt_rtx']} "
            "(RTX GPUs), or build with --backend onnx"
        )
    if importlib.util.find_spec(package) is None:
        raise TensorRTMissing(f"{package} is not installed: {INSTALL[package]} ({GPUS[package]})")
    try:
        return TensorRT(importlib.import_module(package), package)
    except ImportError as exc:
        raise TensorRTMissing(f"{package} is installed but does not import ({str(exc).splitlines()[0]}); "
                              f"reinstall it: {INSTALL[package]}") from None


def release(version: str) -> str:
    """'10.9.0.34' -> '10.9.0': engines are portable between builds of one release, not across releases."""
    return ".".join(version.split(".")[:3])


@dataclasses.dataclass(frozen=True)
class TensorRT:
    trt: ModuleType
    package: str

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def rtx(self) -> bool:
        return self.package == "tensorrt_rtx"

    def describe(self) -> str:
        return f"{self.package} {self.version}"

    def network(self, builder):
        # Strongly typed: every tensor keeps the ONNX type, so fp32 islands (norms, router) stay fp32.
        return builder.create_network(1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    @property
    def has_timing_cache(self) -> bool:
        # TensorRT-RTX does not time tactics ahead of time: its timing-cache calls are no-ops.
        return not self.rtx

    def capabilities(self) -> list[str] | None:
        """Compute capabilities an engine can run on: TensorRT-RTX's fixed list; None for full TensorRT,
        whose engines run only on the GPU model that built them (recorded at build time)."""
        if not self.rtx:
            return None
        names = [n for n in self.trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d+", n)]
        return [f"{n[2:-1]}.{n[-1]}" for n in names]

    def check_record(self, record: dict, plan_bytes: int) -> None:
        """The engine's manifest record against this TensorRT and the plan file, before any GPU work."""
        if record["package"] != self.package:
            raise CannotRun(f"engine.plan was built by {record['package']} ({GPUS[record['package']]}) and "
                            f"{self.package} cannot load it: {INSTALL[record['package']]}")
        if release(record["version"]) != release(self.version):
            raise CannotRun(f"engine.plan was built by {self.package} {record['version']} but {self.version} is "
                            f"installed: engines are tied to the release that built them; rebuild it, or "
                            f"pip install {self.package}=={release(record['version'])}.*")
        if record["bytes"] != plan_bytes:
            raise ArtifactError(f"engine.plan has {plan_bytes} bytes but its manifest records {record['bytes']}: "
                                "the plan and manifest.json come from different builds; rebuild")

    def check_gpu(self, record: dict) -> None:
        """Whether the current CUDA GPU can run an engine with this record."""
        import torch

        if not torch.cuda.is_available():
            raise CannotRun(f"no CUDA GPU here: {self.package} engines run only on NVIDIA {GPUS[self.package]}; "
                            "run this build with --backend ort")
        major, minor = torch.cuda.get_device_capability()
        here, name = f"{major}.{minor}", torch.cuda.get_device_name()
        allowed = self.capabilities()
        if allowed is not None and here not in allowed:
            raise CannotRun(f"{self.package} runs engines on compute capability {', '.join(allowed)}; this GPU "
                            f"({name}) is {here}: run with --backend ort, or build with full tensorrt")
        built_on = record.get("gpu")
        if allowed is None and built_on and built_on["capability"] != here:
            raise CannotRun(f"engine.plan was built on {built_on['name']} (compute capability "
                            f"{built_on['capability']}), this GPU is {name} ({here}): rebuild it on this GPU")

    def check_plan(self, runtime, data: bytes) -> None:
        """TensorRT-RTX reads an engine's header and says why it cannot run here; full TensorRT has no such call."""
        if not hasattr(runtime, "get_engine_validity"):
            return
        validity, diagnostics = runtime.get_engine_validity(data)
        if validity == self.trt.EngineValidity.INVALID:
            reasons = [n for n, v in self.trt.EngineInvalidityDiagnostics.__members__.items() if diagnostics & int(v)]
            raise CannotRun(f"{self.describe()} cannot run engine.plan here: {', '.join(reasons) or 'invalid engine'}")

    def runtime_config(self, engine, cuda_graphs: bool):
        """TensorRT-RTX captures CUDA graphs itself, per input shape; full TensorRT leaves that to the caller."""
        if not self.rtx:
            return None
        config = engine.create_runtime_config()
        if cuda_graphs:
            config.cuda_graph_strategy = self.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return config
