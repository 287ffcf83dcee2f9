"""Our fused MoE kernels inside ONNX Runtime's CUDA graph: the `moe_compile:FusedMoE` custom op.

A build's `com.microsoft:MoE` nodes (the `fused` lowering and the ort form) run on every provider.
On the CUDA provider, ONNX Runtime's MoE spends 47 µs a layer at batch 1 on Qwen1.5-MoE-A2.7B's
shape, 16 of them routing and permutation kernels, where the experts' 69 MB take 17 µs at the
floor (docs/BENCHMARKS.md). Our kernels (plugins/csrc) route, stream each chosen expert once and sum
in three launches. When the custom-op library (plugins/ort_csrc, built with onnxruntime's C header)
is at hand, `ort-cuda` loads the build's graph with each MoE node that our kernels compute swapped
for `moe_compile:FusedMoE`; the weights stay the same initializers, read from the same external
data file: the swap touches the graph, never the files of the build.

    MOE_COMPILE_MOE_KERNELS=ort   keep ONNX Runtime's MoE (comparisons, debugging)
    MOE_COMPILE_ORT_OPS_LIB=PATH  a prebuilt libmoe_compile_ort.so
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..plugins.build import ORT_LIBRARY_NAME, BuildError, build_ort_op, default_build_dir, find_nvcc, ort_include_dir

DOMAIN = "moe_compile"
OP = "FusedMoE"
NO_MOE_NODES = "no com.microsoft:MoE nodes"


@dataclass(frozen=True)
class Swap:
    """The graph to give ONNX Runtime, and which MoE kernels it runs (`reason` says why not ours)."""

    model: onnx.ModelProto | None  # None: load the build's model.onnx unchanged
    library: Path | None
    swapped: int
    reason: str


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def why_not_ours(node: onnx.NodeProto) -> str | None:
    """None if our kernels compute this com.microsoft:MoE node exactly, else the reason."""
    attrs = _attributes(node)
    activation = attrs.get("activation_type", b"relu")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if activation != "swiglu" or attrs.get("swiglu_fusion", 0) != 1:
        return f"activation {activation} (fusion {attrs.get('swiglu_fusion', 0)}); ours is SwiGLU, interleaved"
    if attrs.get("activation_alpha", 1.0) != 1.0 or attrs.get("activation_beta", 0.0) != 0.0 or "swiglu_limit" in attrs:
        return "a scaled or clamped SwiGLU (gpt-oss)"
    if attrs.get("use_sparse_mixer", 0):
        return "sparse-mixer routing"
    if any(name for name in list(node.input)[5:]) or (len(node.input) > 3 and node.input[3]):
        return "expert biases"
    return None


def swap_moe_nodes(model: onnx.ModelProto) -> tuple[int, str]:
    """Replace, in place, every MoE node our kernels compute by moe_compile:FusedMoE.
    Returns (nodes swapped, the reasons of the ones kept, '' if none)."""
    swapped, kept = 0, set()
    for node in model.graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        reason = why_not_ours(node)
        if reason:
            kept.add(reason)
            continue
        attrs = _attributes(node)
        inputs = [node.input[0], node.input[1], node.input[2], node.input[4]]
        replacement = onnx.helper.make_node(OP, inputs, list(node.output), name=node.name, domain=DOMAIN,
                                            k=attrs["k"], normalize_routing_weights=attrs.get("normalize_routing_weights", 0))
        node.CopyFrom(replacement)
        swapped += 1
    if swapped and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return swapped, "; ".join(sorted(kept))


def library(build: bool = True) -> tuple[Path | None, str]:
    """The custom-op library, built first (`build`) where nvcc and onnxruntime's header are at hand; else (None, why)."""
    prebuilt = os.environ.get("MOE_COMPILE_ORT_OPS_LIB")
    if prebuilt:
        return (Path(prebuilt), "") if Path(prebuilt).is_file() else (None, f"MOE_COMPILE_ORT_OPS_LIB={prebuilt} is no file")
    built = default_build_dir() / ORT_LIBRARY_NAME
    if not build or find_nvcc() is None or ort_include_dir() is None:
        if built.is_file():
            return built, ""
        return None, f"{ORT_LIBRARY_NAME} is not built: python -m moe_compile.plugins.build --ort-include DIR"
    try:
        return build_ort_op(), ""
    except BuildError as err:
        return None, f"building {ORT_LIBRARY_NAME} failed: {str(err).splitlines()[-1][:200]}"


def prepare(onnx_path: Path) -> Swap:
    """What the CUDA provider should load for this build's model.onnx."""
    if os.environ.get("MOE_COMPILE_MOE_KERNELS", "") == "ort":
        return Swap(None, None, 0, "MOE_COMPILE_MOE_KERNELS=ort")
    model = onnx.load(str(onnx_path), load_external_data=False)  # the graph only: the weights stay in their file
    if not any(n.op_type == "MoE" and n.domain == "com.microsoft" for n in model.graph.node):
        return Swap(None, None, 0, NO_MOE_NODES)
    path, why = library()
    if path is None:
        return Swap(None, None, 0, why)
    swapped, kept = swap_moe_nodes(model)
    if not swapped:
        return Swap(None, None, 0, kept)
    return Swap(model, path, swapped, kept)
