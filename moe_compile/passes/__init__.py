"""FX passes over the captured program. Importing the modules registers the passes."""

from . import auto, dense, fused, gather, softmax_dtype  # noqa: F401
from .base import PASSES, PassManager, PassResult, data_dependent_nodes, list_passes

LOWERINGS = ("auto", "gather", "dense", "fused")


def lowering_pipeline(lowering: str) -> list[str]:
    """The ordered pass list for a lowering choice (more passes join here, ordered by need). The dtype
    pass comes last: the fused pass matches routers by their softmax's input."""
    return [lowering, "softmax_dtype"]


__all__ = ["LOWERINGS", "PASSES", "PassManager", "PassResult", "data_dependent_nodes", "list_passes", "lowering_pipeline"]
