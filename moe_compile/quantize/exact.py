"""The ort form's quantized ops on float activations: what the build's check (and the tests) compare with the
dequantized reference, exact to float rounding, where the shipped graph rounds activations to int8.

An ort build's `accuracy_level` 4 (int8 and int4, onnx_rewrite.ACCURACY_LEVEL) lets onnxruntime's CPU kernels round
the activations of every MatMulNBits and QMoE to int8 per block; that rounding is tested op by op
(tests/test_quantize.py: exact against numpy doing the same rounding), and on a whole model it only moves logits,
chaotically on random-weight models. What a build must prove is its graph and packing, so the check runs:
- every MatMulNBits and QMoE at accuracy level 0 (model.onnx rewritten in memory, weights left in place);
- onnxruntime 1.32's CPU QMoE with ORT_QMOE_CPU_QNBIT_GEMM=fp32, read when a session creates its kernels: block-wise
  8-bit experts then dequantize to fp32 (slow, exact) instead of rounding activations at every level.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import onnx

QMOE_SWITCH = ("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")


def rounds_activations(quantization: dict | None) -> bool:
    """Whether a build's quantized ops round activations (its manifest's quantization record)."""
    return bool(quantization and quantization.get("accuracy_level"))


def float_activations(onnx_file: Path, options) -> bytes:
    """`onnx_file` with its MatMulNBits and QMoE at accuracy level 0, as bytes; `options` (onnxruntime
    SessionOptions) learn where its external data is. Create the session inside `qmoe_in_float()`."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in ("MatMulNBits", "QMoE"):
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_file.parent))
    return model.SerializeToString()


@contextlib.contextmanager
def qmoe_in_float():
    """ORT_QMOE_CPU_QNBIT_GEMM=fp32 while a session is created (a value the user set is restored after)."""
    name, value = QMOE_SWITCH
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
