"""ctypes view of the kernel library's C ABI (csrc/fused_moe.h). No torch here: pointers are ints.

The TensorRT plugin (trt_plugin.py) calls the same functions; keep this file a 1:1 mirror of the header.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from moe_compile.plugins.build import LIBRARY_NAME, build, default_build_dir, find_nvcc


class Dtype(enum.IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2


class GateUpLayout(enum.IntEnum):
    CONCATENATED = 0  # gate rows, then up rows (transformers 5.x)
    INTERLEAVED = 1  # g0, u0, g1, u1, ... (com.microsoft:MoE swiglu_fusion=1)


class RoutingKind(enum.IntEnum):
    SOFTMAX_TOPK = 0
    SIGMOID_GROUP_TOPK = 1


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    WORKSPACE_TOO_SMALL = 2
    CUDA = 3


class _Shape(ctypes.Structure):
    _fields_ = [("num_tokens", ctypes.c_int64), ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("num_experts", ctypes.c_int64), ("dtype", ctypes.c_int32), ("gate_up_layout", ctypes.c_int32)]


class _Routing(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("top_k", ctypes.c_int32), ("renormalize", ctypes.c_int32),
                ("n_group", ctypes.c_int32), ("topk_group", ctypes.c_int32),
                ("routed_scaling_factor", ctypes.c_float)]


@dataclass(frozen=True)
class Routing:
    """How router logits become (expert ids, weights); mirrors ``moe_routing``."""

    kind: RoutingKind = RoutingKind.SOFTMAX_TOPK
    top_k: int = 2
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def as_c(self) -> _Routing:
        return _Routing(int(self.kind), self.top_k, int(self.renormalize), self.n_group, self.topk_group,
                        self.routed_scaling_factor)


class _Shared(ctypes.Structure):
    _fields_ = [("intermediate", ctypes.c_int64), ("gate_up_layout", ctypes.c_int32), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("gate_logits", ctypes.c_void_p)]


@dataclass(frozen=True)
class SharedExpert:
    """The shared expert every token also runs (``moe_shared_expert``): device pointers as ints.
    out[t] += g_t * down(silu(gate x_t) * up x_t), g_t = sigmoid(gate_logits[t]) or 1 without them."""

    intermediate: int
    gate_up: int  # [2I_s, H]
    down: int  # [H, I_s]
    gate_logits: int | None = None  # [T] float32
    gate_up_layout: GateUpLayout = GateUpLayout.CONCATENATED

    def as_c(self) -> _Shared:
        return _Shared(self.intermediate, int(self.gate_up_layout), self.gate_up, self.down, self.gate_logits)


def _shared_ref(shared: SharedExpert | None):
    return None if shared is None else ctypes.byref(shared.as_c())


class _Quantized(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("block_size", ctypes.c_int32), ("gate_up_scales", ctypes.c_void_p),
                ("down_scales", ctypes.c_void_p), ("shared_gate_up_scales", ctypes.c_void_p),
                ("shared_down_scales", ctypes.c_void_p)]


@dataclass(frozen=True)
class QuantizedExperts:
    """Block-quantized experts (``moe_quantized_experts``): their scales as device pointers; the codes are
    forward_quantized's gate_up and down, and a quantized shared expert's its SharedExpert's gate_up and down."""

    bits: int
    block_size: int
    gate_up_scales: int  # [E, 2I, H / block_size]
    down_scales: int  # [E, H, I / block_size]
    shared_gate_up_scales: int | None = None  # [2I_s, H / block_size]
    shared_down_scales: int | None = None  # [H, I_s / block_size]

    def as_c(self) -> _Quantized:
        return _Quantized(self.bits, self.block_size, self.gate_up_scales, self.down_scales, self.shared_gate_up_scales,
                          self.shared_down_scales)


class KernelError(RuntimeError):
    """A launcher call returned a non-OK status; the message is the library's own text."""


def shape_c(num_tokens: int, hidden: int, intermediate: int, num_experts: int, dtype: Dtype,
            gate_up_layout: GateUpLayout = GateUpLayout.CONCATENATED) -> _Shape:
    return _Shape(num_tokens, hidden, intermediate, num_experts, int(dtype), int(gate_up_layout))


def library_path() -> Path:
    env = os.environ.get("MOE_COMPILE_KERNELS_LIB")
    return Path(env) if env else default_build_dir() / LIBRARY_NAME


@functools.cache
def load() -> ctypes.CDLL:
    """Load the library, building it first when it is missing or stale (where nvcc exists)."""
    path = library_path()
    if not os.environ.get("MOE_COMPILE_KERNELS_LIB") and (find_nvcc() is not None or not path.exists()):
        path = build()
    lib = ctypes.CDLL(str(path))
    p, vp = ctypes.POINTER, ctypes.c_void_p
    lib.moe_compile_workspace_size.argtypes = [p(_Shape), p(_Routing), p(_Shared)]
    lib.moe_compile_workspace_size.restype = ctypes.c_size_t
    lib.moe_compile_forward.argtypes = [p(_Shape), p(_Routing), p(_Shared), vp, vp, vp, vp, vp, vp, vp, ctypes.c_size_t,
                                        vp]
    lib.moe_compile_forward.restype = ctypes.c_int
    lib.moe_compile_workspace_size_quantized.argtypes = [p(_Shape), p(_Routing), p(_Quantized), p(_Shared)]
    lib.moe_compile_workspace_size_quantized.restype = ctypes.c_size_t
    lib.moe_compile_forward_quantized.argtypes = [p(_Shape), p(_Routing), p(_Quantized), p(_Shared), vp, vp, vp, vp, vp,
                                                  vp, vp, ctypes.c_size_t, vp]
    lib.moe_compile_forward_quantized.restype = ctypes.c_int
    lib.moe_compile_route.argtypes = [p(_Shape), p(_Routing), vp, vp, vp, vp, vp]
    lib.moe_compile_route.restype = ctypes.c_int
    i64 = ctypes.c_int64
    lib.moe_compile_to_float.argtypes = [vp, ctypes.c_int32, vp, i64, i64, i64, vp]
    lib.moe_compile_to_float.restype = ctypes.c_int
    lib.moe_compile_router_logits.argtypes = [vp, vp, ctypes.c_int32, i64, i64, i64, ctypes.c_int32, vp, vp, vp]
    lib.moe_compile_router_logits.restype = ctypes.c_int
    lib.moe_compile_skip_rms_norm.argtypes = [vp, vp, vp, vp, ctypes.c_int32, i64, i64, ctypes.c_float, vp, vp, vp]
    lib.moe_compile_skip_rms_norm.restype = ctypes.c_int
    lib.moe_compile_streams_shared.argtypes = [p(_Shape)]
    lib.moe_compile_streams_shared.restype = ctypes.c_int
    lib.moe_compile_silu_mul.argtypes = [vp, ctypes.c_int32, vp, i64, i64, vp]
    lib.moe_compile_silu_mul.restype = ctypes.c_int
    lib.moe_compile_add_gated.argtypes = [vp, vp, vp, ctypes.c_int32, i64, i64, vp]
    lib.moe_compile_add_gated.restype = ctypes.c_int
    lib.moe_compile_quantized_matmul.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int32, ctypes.c_int32,
                                                 ctypes.c_int32, vp]
    lib.moe_compile_quantized_matmul.restype = ctypes.c_int
    lib.moe_compile_decode_attention_workspace_size.argtypes = [i64, i64, i64, i64, i64]
    lib.moe_compile_decode_attention_workspace_size.restype = ctypes.c_size_t
    lib.moe_compile_decode_attention.argtypes = [vp, vp, vp, i64, i64, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64,
                                                 i64, i64, ctypes.c_float, ctypes.c_int32, vp, vp, ctypes.c_size_t, vp,
                                                 vp]
    lib.moe_compile_decode_attention.restype = ctypes.c_int
    lib.moe_compile_top_k_workspace_size.argtypes = [i64, i64]
    lib.moe_compile_top_k_workspace_size.restype = ctypes.c_size_t
    lib.moe_compile_top_k.argtypes = [vp, i64, i64, i64, vp, vp, vp, vp, ctypes.c_size_t, vp]
    lib.moe_compile_top_k.restype = ctypes.c_int
    lib.moe_compile_status_string.argtypes = [ctypes.c_int]
    lib.moe_compile_status_string.restype = ctypes.c_char_p
    return lib


def check(status: int, what: str) -> None:
    if status != Status.OK:
        text = load().moe_compile_status_string(status).decode()
        raise KernelError(f"{what}: {Status(status).name}: {text}")


def workspace_size(shape: _Shape, routing: Routing, shared: SharedExpert | None = None) -> int:
    """Workspace bytes for this shape; raises on arguments the kernels reject."""
    size = load().moe_compile_workspace_size(ctypes.byref(shape), ctypes.byref(routing.as_c()), _shared_ref(shared))
    if size == 0:
        check(Status.INVALID_ARGUMENT, "moe_compile_workspace_size")
    return size


def forward(shape: _Shape, routing: Routing, hidden: int, logits: int, bias: int | None, gate_up: int, down: int,
            out: int, workspace: int, workspace_bytes: int, stream: int, shared: SharedExpert | None = None) -> None:
    status = load().moe_compile_forward(ctypes.byref(shape), ctypes.byref(routing.as_c()), _shared_ref(shared),
                                        hidden, logits, bias, gate_up, down, out, workspace, workspace_bytes, stream)
    check(status, "moe_compile_forward")


def workspace_size_quantized(shape: _Shape, routing: Routing, quant: QuantizedExperts,
                             shared: SharedExpert | None = None) -> int:
    size = load().moe_compile_workspace_size_quantized(ctypes.byref(shape), ctypes.byref(routing.as_c()),
                                                       ctypes.byref(quant.as_c()), _shared_ref(shared))
    if size == 0:
        check(Status.INVALID_ARGUMENT, "moe_compile_workspace_size_quantized")
    return size


def forward_quantized(shape: _Shape, routing: Routing, quant: QuantizedExperts, hidden: int, logits: int,
                      bias: int | None, gate_up: int, down: int, out: int, workspace: int, workspace_bytes: int,
                      stream: int, shared: SharedExpert | None = None) -> None:
    """`shared`: a quantized shared expert (its codes; the scales in `quant`)."""
    status = load().moe_compile_forward_quantized(ctypes.byref(shape), ctypes.byref(routing.as_c()),
                                                  ctypes.byref(quant.as_c()), _shared_ref(shared), hidden, logits, bias,
                                                  gate_up, down, out, workspace, workspace_bytes, stream)
    check(status, "moe_compile_forward_quantized")


def route(shape: _Shape, routing: Routing, logits: int, bias: int | None, ids: int, weights: int,
          stream: int) -> None:
    status = load().moe_compile_route(ctypes.byref(shape), ctypes.byref(routing.as_c()), logits, bias, ids,
                                      weights, stream)
    check(status, "moe_compile_route")


def to_float(src: int, dtype: Dtype, dst: int, rows: int, cols: int, stream: int, src_row_stride: int | None = None) -> None:
    """dst [rows, cols] float32 from src rows of src_row_stride (default cols) elements of dtype."""
    stride = cols if src_row_stride is None else src_row_stride
    check(load().moe_compile_to_float(src, int(dtype), dst, rows, cols, stride, stream), "moe_compile_to_float")


def router_logits(x: int, rows: int, dtype: Dtype, tokens: int, hidden: int, experts: int, logits: int,
                  gate: int | None, stream: int) -> None:
    """logits [tokens, experts] float32 = x [tokens, hidden] rows^T, each rounded to dtype; with gate (rows has
    experts + 1), the last row's logit into gate [tokens] (fused_moe.h)."""
    status = load().moe_compile_router_logits(x, rows, int(dtype), tokens, hidden, experts, int(gate is not None),
                                              logits, gate, stream)
    check(status, "moe_compile_router_logits")


def skip_rms_norm(input: int, skip: int, bias: int | None, gamma: int, dtype: Dtype, rows: int, hidden: int,
                  epsilon: float, out: int, sum_out: int | None, stream: int) -> None:
    """out [rows, hidden] = RMS norm of sum = input + skip (+ bias), times gamma; sum into sum_out where given: as
    com.microsoft:SkipSimplifiedLayerNormalization rounds them on CUDA (fused_moe.h)."""
    status = load().moe_compile_skip_rms_norm(input, skip, bias, gamma, int(dtype), rows, hidden, epsilon, out, sum_out,
                                              stream)
    check(status, "moe_compile_skip_rms_norm")


def streams_shared(shape: _Shape) -> bool:
    """Whether forward streams a shared expert inside the routed decode kernels at this shape."""
    return bool(load().moe_compile_streams_shared(ctypes.byref(shape)))


def silu_mul(gate_up: int, dtype: Dtype, act: int, rows: int, intermediate: int, stream: int) -> None:
    check(load().moe_compile_silu_mul(gate_up, int(dtype), act, rows, intermediate, stream), "moe_compile_silu_mul")


def add_gated(out: int, y: int, gate_logits: int | None, dtype: Dtype, rows: int, hidden: int, stream: int) -> None:
    check(load().moe_compile_add_gated(out, y, gate_logits, int(dtype), rows, hidden, stream), "moe_compile_add_gated")


def quantized_matmul(x: int, codes: int, scales: int, bias: int | None, y: int, rows: int, k: int, n: int, bits: int,
                     block_size: int, dtype: Dtype, stream: int) -> None:
    """y [rows, n] = x [rows, k] W^T (+ bias) for W as com.microsoft:MatMulNBits holds it (fused_moe.h)."""
    status = load().moe_compile_quantized_matmul(x, codes, scales, bias, y, rows, k, n, bits, block_size, int(dtype),
                                                 stream)
    check(status, "moe_compile_quantized_matmul")


def decode_attention(qkv: int, row_stride: int, past_key: int | None, past_value: int | None, present_key: int,
                     present_value: int, seqlens_k: int, cos: int | None, sin: int | None, rotary_half: int,
                     batch: int, num_heads: int, kv_heads: int, head_dim: int, max_seq: int, scale: float,
                     dtype: Dtype, out: int, workspace: int | None, workspace_bytes: int, stream: int,
                     counters: int | None = None) -> None:
    """GroupQueryAttention's decode step on packed QKV rows (fused_moe.h: moe_compile_decode_attention). counters:
    batch x kv_heads int32 zeros (the splits merged in the one launch), or None (a second launch merges)."""
    key, value = qkv + num_heads * head_dim * 2, qkv + (num_heads + kv_heads) * head_dim * 2
    status = load().moe_compile_decode_attention(
        qkv, key, value, row_stride, row_stride, past_key, past_value, present_key, present_value, seqlens_k, cos, sin,
        rotary_half, batch, num_heads, kv_heads, head_dim, max_seq, scale, int(dtype), out, workspace, workspace_bytes,
        counters, stream)
    check(status, "moe_compile_decode_attention")


def decode_attention_workspace_size(batch: int, num_heads: int, kv_heads: int, head_dim: int, max_seq: int) -> int:
    return load().moe_compile_decode_attention_workspace_size(batch, num_heads, kv_heads, head_dim, max_seq)


def top_k_workspace_size(rows: int, n: int) -> int:
    return load().moe_compile_top_k_workspace_size(rows, n)


def top_k(x: int, rows: int, n: int, k: int, values: int, indices: int, argmax: int | None, workspace: int,
          workspace_bytes: int, stream: int) -> None:
    """The k largest of each float32 row of x [rows, n], best first, ties to the lower index, and the rows' argmax
    (fused_moe.h: moe_compile_top_k)."""
    status = load().moe_compile_top_k(x, rows, n, k, values, indices, argmax, workspace, workspace_bytes, stream)
    check(status, "moe_compile_top_k")
