"""moe-compile: HuggingFace Mixture-of-Experts models -> static FX graph -> ONNX -> runtimes."""

from .api import CompiledModel, Generation, build, load
from .errors import MoeCompileError

__all__ = ["CompiledModel", "Generation", "MoeCompileError", "build", "load"]
