"""The decode floor: the bytes one decode step must read, over the memory bandwidth measured on the
device the backend runs on. `moe-compile bench` reports each row's floor and our share of it.

Bytes a decode step must read at batch B with P tokens in the cache, counted from the build itself
(the ONNX initializers, the MoE nodes' attributes and the manifest), whatever the lowering does:

- every initializer the graph reads whole: attention, norms, dense MLPs, shared experts, routers, lm_head;
- the embedding table: B rows, where only `Gather(table, input_ids)` reads it (a tied lm_head reads it
  whole); likewise GroupQueryAttention's rotary cos/sin caches (the ort form);
- the routed experts, per MoE layer: the selected experts' share of that layer's expert tensors. At
  batch 1 that is k of E experts. At batch B it is the expected number of distinct experts under
  uniform, independent routing, E·(1 − (1 − k/E)^B) (an expert is missed by one row with probability
  1 − k/E); real routers are less uniform, so real batches select fewer and this errs high for B > 1;
- the KV cache: B·P positions of every layer's key and value, in the build's dtype.

Not counted: activations, logits, the one KV row a step writes. Expert tensors are the initializers
named under a MoE layer of the manifest (`layers`), or the weights a `com.microsoft:MoE` or `QMoE` node
reads (its `k` attribute is that layer's top-k; a quantized build's experts count at their packed size).
Elsewhere E is the expert tensors' first dim and k the K of the router's TopK over E entries (the
manifest's `family["top_k"]` first, where a build records it).

Bandwidth convention (as docs/BENCHMARKS.md's copy figure): bytes read + bytes written per second of
one large copy, median of repeats. CUDA: a 1 GiB device-to-device `cudaMemcpy` (the CUDA runtime
through ctypes, as runtime/memory.py loads it). CPU: a 256 MiB `numpy.copyto`, one thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from ..errors import ArtifactError
from ..export.manifest import ONNX_FILE, Manifest
from ..trt.precision import all_graphs

_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_KV_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclasses.dataclass
class ExpertLayer:
    names: list[str]  # its expert tensors (weights and biases), each [E, ...]
    bytes: int  # all E experts
    experts: int  # E
    top_k: int  # k


@dataclasses.dataclass
class StepBytes:
    """What one decode step reads, split by kind; `total(batch, past)` gives the bytes at a batch size and
    cache length."""

    whole: int  # initializers read whole every step
    row: int  # bytes a step reads per batch row from row-indexed tables (embedding, rotary caches)
    experts: list[ExpertLayer]
    kv_per_token: int  # key + value bytes of one cached position, all layers

    def expert_bytes(self, batch: int) -> float:
        return sum(layer.bytes * distinct_experts(layer.experts, layer.top_k, batch) / layer.experts
                   for layer in self.experts)

    def total(self, batch: int, past: float) -> float:
        return self.whole + batch * self.row + self.expert_bytes(batch) + batch * past * self.kv_per_token


def distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts that `batch` rows select, each picking top_k of `experts` uniformly."""
    return experts * (1 - (1 - top_k / experts) ** batch)


def step_bytes(out: Path, manifest: Manifest) -> StepBytes:
    path = Path(out) / ONNX_FILE
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise ArtifactError(f"cannot read {path} ({str(exc).splitlines()[0][:200]}); rebuild it") from None
    graphs = list(all_graphs(model.graph))
    sizes = {t.name: _nbytes(t) for t in model.graph.initializer}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
    used = {name for name in sizes if name in consumers}

    experts = _fused_layers(graphs, sizes, dims)
    claimed = {name for layer in experts for name in layer.names}
    recorded, router = manifest.family.get("top_k"), _router_top_k(graphs, model.graph)
    for module in manifest.layers:
        names = [n for n in used if f".{module}." in f".{n}" and n not in claimed and dims[n]]
        if not names:
            continue
        count = dims[names[0]][0]
        k = recorded or router.get(count)
        if not k:
            raise ArtifactError(f"{path}: cannot tell the top-k of MoE layer {module} ({count} experts): no TopK over "
                                f"{count} entries and no family['top_k'] in the manifest")
        experts.append(ExpertLayer(sorted(names), sum(sizes[n] for n in names), count, int(k)))
        claimed.update(names)

    # Tables a step reads one row of per batch row: the embedding (where only Gather(table, input_ids)
    # reads it) and GroupQueryAttention's rotary cos/sin caches (inputs 7 and 8, [max_seq, dim/2]).
    rows = {}
    for node in consumers.get("input_ids", []):
        table = node.input[0]
        if node.op_type == "Gather" and table in sizes and all(c.op_type == "Gather" for c in consumers[table]):
            rows[table] = sizes[table] // dims[table][0]
    for node in (n for g in graphs for n in g.node if n.op_type == "GroupQueryAttention"):
        for table in node.input[7:9]:
            if table in sizes and all(c.op_type == "GroupQueryAttention" for c in consumers[table]):
                rows[table] = sizes[table] // dims[table][0]
    whole = sum(sizes[n] for n in used if n not in claimed and n not in rows)
    itemsize = _KV_ITEMSIZE[manifest.dtype]
    kv_per_token = sum(heads * dim * itemsize for layer in manifest.kv["layers"] for heads, dim in layer)
    return StepBytes(whole, sum(rows.values()), experts, kv_per_token)


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


# The expert tensors among an op's inputs: MoE's fc1/fc2/fc3 weights and biases; QMoE's codes, scales,
# biases and zero points (its input 14, the router weights, is an activation).
_EXPERT_INPUTS = {"MoE": slice(2, 8), "QMoE": slice(2, 14)}


def _fused_layers(graphs, sizes: dict[str, int], dims: dict[str, list[int]]) -> list[ExpertLayer]:
    """The weights each com.microsoft:MoE or QMoE node reads (inputs 2.., traced back through the ops
    that prepare them, e.g. the gate/up interleave; QMoE's packed codes and block scales), and its k."""
    producers = {o: n for g in graphs for n in g.node for o in n.output}
    layers = []
    for node in (n for g in graphs for n in g.node):
        if node.op_type not in _EXPERT_INPUTS or node.domain != "com.microsoft":
            continue
        names: set[str] = set()
        stack = [name for name in node.input[_EXPERT_INPUTS[node.op_type]] if name]
        while stack:
            name = stack.pop()
            if name in sizes:
                names.add(name)
            elif name in producers:
                stack.extend(i for i in producers[name].input if i)
        names = {n for n in names if len(dims[n]) >= 2}  # not the Reshapes' shape constants
        k = next(a.i for a in node.attribute if a.name == "k")
        count = max(dims[n][0] for n in names)
        layers.append(ExpertLayer(sorted(names), sum(sizes[n] for n in names), count, k))
    return layers


def _router_top_k(graphs, main: onnx.GraphProto) -> dict[int, int]:
    """{entries: K} of the TopK nodes with a constant K over a statically sized last axis: the
    router's top-k over its E experts (a grouped router's group TopKs run over fewer entries)."""
    constants = {t.name: t for t in main.initializer}
    shapes = {}
    for graph in graphs:
        for node in graph.node:
            if node.op_type == "Constant":
                constants.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
        for value in (*graph.value_info, *graph.input, *graph.output):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    found: dict[int, int] = {}
    for node in (n for g in graphs for n in g.node):
        if node.op_type != "TopK" or node.input[1] not in constants or not shapes.get(node.input[0]):
            continue
        entries = shapes[node.input[0]][-1]
        if entries:
            found[entries] = int(onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0])
    return found


def copy_bandwidth(device: str, repeats: int = 20) -> float:
    """Bytes read + written per second of one large copy on `device` ('cuda' or 'cpu'), median of repeats."""
    if device == "cuda":
        return _cuda_copy_bandwidth(repeats)
    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats // 4 + 3):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times[2:])


def _cuda_copy_bandwidth(repeats: int) -> float:
    from .memory import _check, _cudart

    lib, size = _cudart(), 1 << 30
    src, dst = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.cudaMalloc(ctypes.byref(src), ctypes.c_size_t(size)), "cudaMalloc")
    try:
        _check(lib.cudaMalloc(ctypes.byref(dst), ctypes.c_size_t(size)), "cudaMalloc")
        times = []
        for _ in range(repeats + 3):
            _check(lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            start = time.perf_counter()
            _check(lib.cudaMemcpy(dst, src, ctypes.c_size_t(size), ctypes.c_int(_DEVICE_TO_DEVICE)), "cudaMemcpy")
            _check(lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            times.append(time.perf_counter() - start)
    finally:
        for pointer in (src, dst):
            if pointer.value:
                lib.cudaFree(pointer)
    return 2 * size / statistics.median(times[3:])
