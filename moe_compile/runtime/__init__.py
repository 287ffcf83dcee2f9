"""Backends (ONNX Runtime, TensorRT, torch reference) and the shared decode loop."""

from . import ort_backend, ort_inplace, torch_backend, trt_backend  # noqa: F401  (register the backends)
from .backend import BACKENDS, Backend
from .generate import Stats, generate
from .sampling import Chooser, Sampling

__all__ = ["BACKENDS", "Backend", "Chooser", "Sampling", "Stats", "generate"]
