"""ONNX -> TensorRT engine (engine.plan): parser, two optimization profiles, strongly typed precision,
timing cache. One compat layer (compat.py) serves `tensorrt` and `tensorrt_rtx`; neither is imported
until an engine is built or run."""

from .engine import ENGINE_FILE, build_engine

__all__ = ["ENGINE_FILE", "build_engine"]
