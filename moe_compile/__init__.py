"""moe-compile: HuggingFace Mixture-of-Experts models -> static FX graph -> ONNX -> runtimes.

The API is imported on first use, so `import moe_compile` (and the CLI's start-up, where Ctrl-C must end
quietly) does not load torch.
"""

import sys
import types

from .errors import MoeCompileError

__all__ = ["CompiledModel", "Generation", "MoeCompileError", "build", "load"]


def _api(name: str):
    from . import api

    return getattr(api, name)


class _Package(types.ModuleType):
    # Properties, not a module __getattr__: importing the submodule `moe_compile.build` binds that name on
    # the package, and a data descriptor keeps `moe_compile.build` the API function all the same.
    CompiledModel = property(lambda self: _api("CompiledModel"))
    Generation = property(lambda self: _api("Generation"))
    load = property(lambda self: _api("load"))
    build = property(lambda self: _api("build"), lambda self, submodule: None)


sys.modules[__name__].__class__ = _Package
