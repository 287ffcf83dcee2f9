"""`moe-compile inspect` for engine.plan: its record, I/O, profiles and (where TensorRT can load the
plan) the layer summary from TensorRT's engine inspector."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from ..errors import MoeCompileError
from . import profiles
from .engine import engine_from_plan, tensor_io


def describe(out: Path, manifest) -> list[str]:
    record = manifest.engine
    lines = [f"engine {record['file']}: {record['package']} {record['version']}, {record['precision']} strongly typed, "
             f"{record['bytes'] / 2**20:.1f} MiB, built in {record['build_seconds']:.1f} s"]
    for name in profiles.PROFILES:
        shapes = record["profiles"][name]
        lines.append(f"profile {name}: " + ", ".join(
            f"{tensor} {low}..{high}" for tensor, (low, _, high) in shapes.items() if not tensor.startswith("past_key_values.")
            or tensor.endswith(".0.key")))
    if record["fp32_ops"]:
        lines.append("fp32 in this " + record["precision"] + " engine: " + "; ".join(
            f"{module} " + ", ".join(f"{op} {n}" for op, n in ops.items()) for module, ops in record["fp32_ops"].items()))
    try:
        t, engine = engine_from_plan(out, manifest)
    except MoeCompileError as exc:
        return lines + [f"engine layers: not inspectable here ({exc})"]
    for name, value in tensor_io(t, engine).items():
        lines.append(f"engine {value['mode']:6} {name:32} {value['dtype']:8} {value['shape']}")
    inspector = engine.create_engine_inspector()
    layers = [json.loads(inspector.get_layer_information(i, t.trt.LayerInformationFormat.JSON))
              for i in range(engine.num_layers)]
    kinds = collections.Counter(layer.get("LayerType", "?") if isinstance(layer, dict) else "?" for layer in layers)
    lines.append(f"engine layers {len(layers)}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    return lines
