"""FX -> ONNX and the manifest that describes the build."""

from .manifest import Manifest, read_manifest
from .onnx_export import IR_VERSION, OPSET, export_onnx

__all__ = ["IR_VERSION", "OPSET", "Manifest", "export_onnx", "read_manifest"]
