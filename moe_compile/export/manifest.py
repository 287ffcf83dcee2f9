"""`manifest.json`: everything a runtime needs to drive the build output without the checkpoint.

One schema (pydantic, strict types and ranges) validates it wherever it is read; `read_manifest` adds
the checks against the files beside it: every listed file present with its recorded size and, when
asked (`verify`, `inspect`), model.onnx's sha256 and its inputs/outputs.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import onnx
import pydantic
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from typing_extensions import NotRequired, TypedDict

from ..errors import ArtifactError

FORMAT_VERSION = 2  # 2: strict schema, file sizes and model.onnx's sha256
FORMAT = f"moe-compile/{FORMAT_VERSION}"
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
CHECKSUMMED = (ONNX_FILE,)  # the graph; the weights' files are checked by size (hashing GBs would slow every build)
# model.onnx files up to this size (graph only, or small inline weights) are cross-checked on every load; a
# larger one (inline weights under 2 GB) only by `verify`/`inspect`: parsing it would double a load's peak memory.
IO_CHECK_BYTES = 256 * 2**20
KV_DTYPES = {name: onnx.helper.tensor_dtype_to_np_dtype(t).name
             for name, t in (("fp32", onnx.TensorProto.FLOAT), ("fp16", onnx.TensorProto.FLOAT16),
                             ("bf16", onnx.TensorProto.BFLOAT16))}


class IoValue(TypedDict):
    name: str
    dtype: str
    shape: list[int | str]  # symbolic dims by name


class KvLayout(TypedDict):
    layout: Literal["shared_buffer", "past_present_concat"]
    axes: NotRequired[list[str]]
    num_layers: PositiveInt
    layers: list[list[list[PositiveInt]]]  # per layer [[heads, key_dim], [heads, value_dim]]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: dict[str, Any]  # model_type, routing, renormalize, attention, shared_expert
    source: str
    dtype: Literal["fp32", "fp16", "bf16"]
    lowering: Literal["auto", "gather", "dense", "fused"]
    auto_threshold: NonNegativeInt
    layers: dict[str, str]  # experts module -> lowering applied ("dense" MLP layers are absent)
    max_batch: PositiveInt
    max_seq: int = Field(ge=2)
    max_position_embeddings: PositiveInt | None = None  # the model's; max_seq never exceeds it
    vocab_size: PositiveInt
    eos_token_ids: list[NonNegativeInt]
    pad_token_id: NonNegativeInt
    kv: KvLayout
    inputs: list[IoValue]
    outputs: list[IoValue]
    opset: PositiveInt
    ir_version: PositiveInt
    files: list[str]
    tokenizer: bool
    tool_versions: dict[str, str]
    format: Literal[FORMAT] = FORMAT
    # "portable": past/present concat, standard ops (TensorRT, any runtime); "ort": ONNX Runtime's in-place form
    # (GroupQueryAttention over preallocated [B, kv_heads, max_seq, head_dim] buffers, last-token logits,
    # ArgMax/TopK in the graph). docs/PIPELINE.md says which backend reads which.
    form: Literal["portable", "ort"] = "portable"
    form_reason: str | None = None  # why a build asked for the ort form got the portable one
    sampling_candidates: NonNegativeInt = 0  # ort form: C of the graph's TopK output (top_logits/top_ids)
    # the most tokens (batch x new) one run may take: its tensors stay under 2^31 elements (passes/run_size.py)
    max_run_tokens: PositiveInt | None = None
    fallbacks: dict[str, str] = {}  # experts module -> why it did not get `lowering`
    # engine.plan's record (moe_compile/trt/engine.py: package, version, profiles, ...); None without an engine
    engine: dict[str, Any] | None = None
    # weight-only quantization (moe_compile/quantize/): scheme, bits, block_size, scales, classes quantized, ops,
    # bytes per weight class before/after, tensors left unquantized and why; None: not quantized
    quantization: dict[str, Any] | None = None
    tokenizer_error: str | None = None  # why the checkpoint's tokenizer was left out, when it has a broken one
    file_sizes: dict[str, NonNegativeInt] = {}  # bytes of each listed file, checked on every load
    sha256: dict[str, str] = {}  # of CHECKSUMMED files, checked by `verify` and `inspect`

    @pydantic.field_validator("files")
    @classmethod
    def _plain_names(cls, files: list[str]) -> list[str]:
        bad = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
        if bad:
            raise ValueError(f"'{bad[0]}' is not a file name in the build directory")
        if ONNX_FILE not in files:
            raise ValueError(f"{ONNX_FILE} is not listed")
        return files

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Manifest:
        ids = [*self.eos_token_ids, self.pad_token_id]
        if self.max_position_embeddings is not None and self.max_seq > self.max_position_embeddings:
            raise ValueError(f"max_seq {self.max_seq} exceeds the model's max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if max(ids) >= self.vocab_size:
            raise ValueError(f"token id {max(ids)} (eos/pad) is outside the vocabulary 0..{self.vocab_size - 1}")
        if self.kv["num_layers"] != len(self.kv["layers"]):
            raise ValueError(f"kv.num_layers is {self.kv['num_layers']} but kv.layers has {len(self.kv['layers'])}")
        if any(len(layer) != 2 or any(len(kv) != 2 for kv in layer) for layer in self.kv["layers"]):
            raise ValueError("kv.layers must hold [[heads, key_dim], [heads, value_dim]] per layer")
        kv_inputs = [v for v in self.inputs if v["name"].startswith("past_key_values.")]
        if len(kv_inputs) != 2 * self.kv["num_layers"]:
            raise ValueError(f"inputs has {len(kv_inputs)} KV tensors for kv.num_layers {self.kv['num_layers']}")
        wrong = sorted({v["dtype"] for v in kv_inputs} - {KV_DTYPES[self.dtype]})
        if wrong:
            raise ValueError(f"dtype is {self.dtype} but the KV inputs are {', '.join(wrong)}")
        unlisted = sorted(set(self.file_sizes) - set(self.files))
        if unlisted:
            raise ValueError(f"file_sizes names '{unlisted[0]}', which files does not list")
        return self

    def kv_cache_bytes(self, batch: int | None = None) -> int:
        """The KV cache of `batch` (default max_batch) rows of max_seq tokens: one copy of what a backend preallocates."""
        per_token = sum(heads * dim for layer in self.kv["layers"] for heads, dim in layer)
        rows = self.max_batch if batch is None else batch
        return rows * self.max_seq * per_token * {"fp32": 4, "fp16": 2, "bf16": 2}[self.dtype]

    def write(self, out: Path) -> None:
        """Record each listed file's size (and the sha256 of CHECKSUMMED ones), then write manifest.json."""
        self.file_sizes = {name: (out / name).stat().st_size for name in self.files}
        self.sha256 = {name: sha256(out / name) for name in CHECKSUMMED if name in self.files}
        (out / MANIFEST).write_text(self.model_dump_json(indent=2) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def io_signature(onnx_path: Path) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic dims by name) of the ONNX graph's inputs and outputs."""
    return _describe(onnx.load(str(onnx_path), load_external_data=False).graph)


def _describe(graph) -> tuple[list[dict], list[dict]]:
    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("moe-compile", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(out: Path, check: bool = False) -> Manifest:
    """Read and validate OUT/manifest.json and the sizes of the files it lists, failing with one line
    that names the problem. `check` also compares model.onnx's sha256 with the record and reads its external data
    sizes; model.onnx's inputs/outputs are compared with the record always, or only then for a large file."""
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: '{out}' is not a moe-compile build output")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is corrupt (not UTF-8 text); rebuild with 'moe-compile build'") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); rebuild with 'moe-compile build'") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is corrupt (a JSON {type(data).__name__}, not an object); rebuild with 'moe-compile build'")
    _check_format(path, data)
    try:
        manifest = Manifest.model_validate(data, strict=True)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(map(str, error["loc"])) or "(top level)"
        raise ArtifactError(f"{path} is corrupt: {field}: {error['msg']} (got {error['input']!r:.60}); "
                            "rebuild with 'moe-compile build'") from None
    _check_files(out, manifest, check)
    return manifest


def _check_format(path: Path, data: dict) -> None:
    """Refuse a manifest of another format version, saying which moe-compile wrote it."""
    found = data.get("format")
    if found == FORMAT:
        return
    writer = (data.get("tool_versions") or {}).get("moe-compile", "an unknown version") if isinstance(
        data.get("tool_versions"), dict) else "an unknown version"
    prefix, _, version = found.partition("/") if isinstance(found, str) else ("", "", "")
    if prefix != "moe-compile" or not version.isdigit():
        raise ArtifactError(f"{path} has format {found!r}, expected {FORMAT!r}: not a moe-compile manifest")
    if int(version) > FORMAT_VERSION:
        raise ArtifactError(f"{path} is format {found}, written by moe-compile {writer}; this moe-compile "
                            f"({metadata.version('moe-compile')}) reads {FORMAT}: upgrade moe-compile")
    raise ArtifactError(f"{path} is format {found}, written by moe-compile {writer}; this moe-compile reads {FORMAT}: "
                        "rebuild it with 'moe-compile build'")


def _check_files(out: Path, manifest: Manifest, check: bool) -> None:
    missing = [name for name in manifest.files if not (out / name).is_file()]
    if missing:
        raise ArtifactError(f"{out} lacks {', '.join(missing)} listed in its manifest; rebuild it")
    for name, size in manifest.file_sizes.items():
        actual = (out / name).stat().st_size
        if actual != size:
            raise ArtifactError(f"{out / name} is {actual} bytes, its manifest records {size}: the file was truncated "
                                "or replaced; rebuild it")
    if check:
        for name, digest in manifest.sha256.items():
            if sha256(out / name) != digest:
                raise ArtifactError(f"{out / name} does not match its manifest's sha256: the file was changed or "
                                    "replaced; rebuild it")
    if check or (out / ONNX_FILE).stat().st_size <= IO_CHECK_BYTES:
        _check_onnx(out / ONNX_FILE, manifest, external_data=check)


def _check_onnx(path: Path, manifest: Manifest, external_data: bool) -> None:
    """model.onnx parses, has the recorded inputs/outputs, and its external data files hold every byte it
    declares (a truncated model.onnx.data would otherwise fail only when a runtime loads it)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a damaged protobuf
        raise ArtifactError(f"{path} is corrupt ({type(exc).__name__}); rebuild it") from None
    inputs, outputs = _describe(model.graph)
    for kind, recorded, actual in (("inputs", manifest.inputs, inputs), ("outputs", manifest.outputs, outputs)):
        if [dict(v) for v in recorded] != actual:
            raise ArtifactError(f"{path}'s {kind} differ from its manifest's: model.onnx is from another build; rebuild it")
    if not external_data:
        return
    needed: dict[str, int] = {}
    for tensor in _tensors(model.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            end = (info.offset or 0) + (info.length or 0)
            needed[info.location] = max(needed.get(info.location, 0), end)
    for location, end in needed.items():
        data = path.parent / location
        size = data.stat().st_size if data.is_file() else None
        if size is None or size < end:
            raise ArtifactError(f"{data} {'is missing' if size is None else f'is {size} bytes'}, model.onnx reads up to "
                                f"byte {end}: the weights are truncated; rebuild it")


def _tensors(graph):
    """The graph's initializers, and those of subgraphs (an `If`'s branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)
