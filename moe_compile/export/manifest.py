"""`manifest.json`: everything a runtime needs to drive the build output without the checkpoint."""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from ..errors import ArtifactError

FORMAT = "moe-compile/1"
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


@dataclasses.dataclass
class Manifest:
    family: dict[str, Any]  # model_type, routing, renormalize, attention, shared_expert
    source: str
    dtype: str
    lowering: str
    auto_threshold: int
    layers: dict[str, str]  # experts module -> lowering applied ("dense" MLP layers are absent)
    max_batch: int
    max_seq: int
    vocab_size: int
    eos_token_ids: list[int]
    pad_token_id: int
    kv: dict[str, Any]  # layout, num_layers, per-layer (heads, dim) of key and value
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int
    ir_version: int
    files: list[str]
    tokenizer: bool
    tool_versions: dict[str, str]
    format: str = FORMAT
    # "portable": past/present concat, standard ops (TensorRT, any runtime); "ort": ONNX Runtime's in-place form
    # (GroupQueryAttention over preallocated [B, kv_heads, max_seq, head_dim] buffers, last-token logits,
    # ArgMax/TopK in the graph). docs/PIPELINE.md says which backend reads which.
    form: str = "portable"
    form_reason: str | None = None  # why a build asked for the ort form got the portable one
    sampling_candidates: int = 0  # ort form: C of the graph's TopK output (top_logits/top_ids)
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)  # experts module -> why it did not get `lowering`
    # engine.plan's record (moe_compile/trt/engine.py: package, version, profiles, ...); None without an engine
    engine: dict[str, Any] | None = None

    def write(self, out: Path) -> None:
        (out / MANIFEST).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def io_signature(onnx_path: Path) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic dims by name) of the ONNX graph's inputs and outputs."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("moe-compile", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(out: Path) -> Manifest:
    """Read and validate OUT/manifest.json, failing with one line that names the problem."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: '{out}' is not a moe-compile build output")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path} is corrupt ({str(exc).splitlines()[0]}); rebuild with 'moe-compile build'") from None
    missing = [name for name in manifest.files if not (Path(out) / name).is_file()]
    if missing:
        raise ArtifactError(f"{out} lacks {', '.join(missing)} listed in its manifest; rebuild it")
    return manifest
