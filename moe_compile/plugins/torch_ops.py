"""torch binding of the fused MoE kernels: two custom ops calling the C ABI through ctypes.

    torch.ops.moe_compile.fused_moe_cuda(hidden, router_logits, gate_up_proj, down_proj, expert_bias,
                                         top_k, renormalize, routing_kind, n_group, topk_group,
                                         routed_scaling_factor) -> out [T, H]
    torch.ops.moe_compile.fused_moe_quantized_cuda(hidden, router_logits, gate_up_codes, gate_up_scales,
                                                   down_codes, down_scales, bits, block_size, top_k, renormalize)
                                         -> out [T, H]   (experts as com.microsoft:QMoE holds them, fused_moe.h)
    torch.ops.moe_compile.quantized_matmul_cuda(x, codes, scales, bias, bits, block_size)
                                         -> y [M, N] = x [M, K] W^T (+ bias), W as com.microsoft:MatMulNBits holds it
    torch.ops.moe_compile.moe_route_cuda(router_logits, expert_bias, top_k, renormalize, routing_kind,
                                         n_group, topk_group, routed_scaling_factor)
                                         -> (topk_ids [T, K] int32, topk_weights [T, K] float32)

Weights use transformers 5.x's layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]. The kernels
run on the current CUDA stream; the workspace comes from torch's caching allocator.
"""


import torch

from moe_compile.plugins import library
from moe_compile.plugins.library import Dtype, Routing, RoutingKind

_DTYPES = {torch.float32: Dtype.F32, torch.float16: Dtype.F16, torch.bfloat16: Dtype.BF16}


def _routing(top_k: int, renormalize: bool, routing_kind: int, n_group: int, topk_group: int,
             routed_scaling_factor: float) -> Routing:
    return Routing(RoutingKind(routing_kind), top_k, renormalize, n_group, topk_group, routed_scaling_factor)


def _check_inputs(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"fused_moe_cuda: dtype {hidden.dtype} not supported (float32, float16, bfloat16)")
    if not (gate_up_proj.dtype == down_proj.dtype == hidden.dtype):
        raise TypeError("fused_moe_cuda: hidden, gate_up_proj and down_proj must share one dtype")
    num_experts, two_i, hidden_size = gate_up_proj.shape
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or down_proj.shape != (num_experts, hidden_size, two_i // 2):
        raise ValueError(f"fused_moe_cuda: shapes hidden {tuple(hidden.shape)}, gate_up_proj "
                         f"{tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)} do not fit "
                         "[T,H], [E,2I,H], [E,H,I]")
    for name, t in (("hidden", hidden), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not t.is_contiguous():
            raise ValueError(f"fused_moe_cuda: {name} must be contiguous")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@torch.library.custom_op("moe_compile::fused_moe_cuda", mutates_args=(), device_types="cuda")
def fused_moe_cuda(hidden: torch.Tensor, router_logits: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, renormalize: bool,
                   routing_kind: int = 0, n_group: int = 1, topk_group: int = 1,
                   routed_scaling_factor: float = 1.0) -> torch.Tensor:
    _check_inputs(hidden, gate_up_proj, down_proj)
    num_experts, two_i, hidden_size = gate_up_proj.shape
    shape = library.shape_c(hidden.shape[0], hidden_size, two_i // 2, num_experts, _DTYPES[hidden.dtype])
    routing = _routing(top_k, renormalize, routing_kind, n_group, topk_group, routed_scaling_factor)
    logits = router_logits.float().contiguous()
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    out = torch.empty_like(hidden)
    with torch.cuda.device(hidden.device):
        size = library.workspace_size(shape, routing)
        workspace = torch.empty(size, dtype=torch.uint8, device=hidden.device)
        library.forward(shape, routing, hidden.data_ptr(), logits.data_ptr(), _ptr(bias), gate_up_proj.data_ptr(),
                        down_proj.data_ptr(), out.data_ptr(), workspace.data_ptr(), size,
                        torch.cuda.current_stream().cuda_stream)
    return out


@fused_moe_cuda.register_fake
def _(hidden, router_logits, gate_up_proj, down_proj, expert_bias, top_k, renormalize, routing_kind=0, n_group=1,
      topk_group=1, routed_scaling_factor=1.0):
    return torch.empty_like(hidden)


@torch.library.custom_op("moe_compile::fused_moe_quantized_cuda", mutates_args=(), device_types="cuda")
def fused_moe_quantized_cuda(hidden: torch.Tensor, router_logits: torch.Tensor, gate_up_codes: torch.Tensor,
                             gate_up_scales: torch.Tensor, down_codes: torch.Tensor, down_scales: torch.Tensor,
                             bits: int, block_size: int, top_k: int, renormalize: bool) -> torch.Tensor:
    if hidden.dtype not in _DTYPES or not (gate_up_scales.dtype == down_scales.dtype == hidden.dtype):
        raise TypeError("fused_moe_quantized_cuda: hidden and the scales must share one of float32, float16, bfloat16")
    if gate_up_codes.dtype != torch.uint8 or down_codes.dtype != torch.uint8:
        raise TypeError("fused_moe_quantized_cuda: codes must be uint8")
    num_experts, two_i = gate_up_codes.shape[:2]
    hidden_size = hidden.shape[1]
    if gate_up_codes.shape != (num_experts, two_i, hidden_size * bits // 8) \
            or down_codes.shape != (num_experts, hidden_size, two_i // 2 * bits // 8):
        raise ValueError(f"fused_moe_quantized_cuda: codes {tuple(gate_up_codes.shape)}, {tuple(down_codes.shape)} do "
                         f"not fit [E, 2I, H*bits/8], [E, H, I*bits/8] for hidden {tuple(hidden.shape)}")
    tensors = (hidden, gate_up_codes, gate_up_scales, down_codes, down_scales)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("fused_moe_quantized_cuda: inputs must be contiguous")
    shape = library.shape_c(hidden.shape[0], hidden_size, two_i // 2, num_experts, _DTYPES[hidden.dtype],
                            library.GateUpLayout.INTERLEAVED)
    routing = Routing(RoutingKind.SOFTMAX_TOPK, top_k, renormalize)
    quant = library.QuantizedExperts(bits, block_size, gate_up_scales.data_ptr(), down_scales.data_ptr())
    logits = router_logits.float().contiguous()
    out = torch.empty_like(hidden)
    with torch.cuda.device(hidden.device):
        size = library.workspace_size_quantized(shape, routing, quant)
        workspace = torch.empty(size, dtype=torch.uint8, device=hidden.device)
        library.forward_quantized(shape, routing, quant, hidden.data_ptr(), logits.data_ptr(), None,
                                  gate_up_codes.data_ptr(), down_codes.data_ptr(), out.data_ptr(), workspace.data_ptr(),
                                  size, torch.cuda.current_stream().cuda_stream)
    return out


@fused_moe_quantized_cuda.register_fake
def _(hidden, router_logits, gate_up_codes, gate_up_scales, down_codes, down_scales, bits, block_size, top_k,
      renormalize):
    return torch.empty_like(hidden)


@torch.library.custom_op("moe_compile::quantized_matmul_cuda", mutates_args=(), device_types="cuda")
def quantized_matmul_cuda(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                          bits: int, block_size: int) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16) or scales.dtype != x.dtype \
            or (bias is not None and bias.dtype != x.dtype):
        raise TypeError("quantized_matmul_cuda: x, scales and bias must share one of float16, bfloat16")
    if codes.dtype != torch.uint8:
        raise TypeError("quantized_matmul_cuda: codes must be uint8")
    n, k = codes.shape[0], x.shape[-1]
    if x.dim() != 2 or codes.numel() != n * k * bits // 8 or scales.numel() != n * k // block_size \
            or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"quantized_matmul_cuda: x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales "
                         f"{tuple(scales.shape)} do not fit [M, K], [N, K*bits/8], [N, K/block_size]")
    if not all(t.is_contiguous() for t in (x, codes, scales) + ((bias,) if bias is not None else ())):
        raise ValueError("quantized_matmul_cuda: inputs must be contiguous")
    y = x.new_empty(x.shape[0], n)
    with torch.cuda.device(x.device):
        library.quantized_matmul(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(),
                                 x.shape[0], k, n, bits, block_size, _DTYPES[x.dtype],
                                 torch.cuda.current_stream().cuda_stream)
    return y


@quantized_matmul_cuda.register_fake
def _(x, codes, scales, bias, bits, block_size):
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("moe_compile::moe_route_cuda", mutates_args=(), device_types="cuda")
def moe_route_cuda(router_logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, renormalize: bool,
                   routing_kind: int = 0, n_group: int = 1, topk_group: int = 1,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = router_logits.shape
    # Routing never reads H or I; any valid value will do.
    shape = library.shape_c(num_tokens, 8, 8, num_experts, Dtype.F32)
    routing = _routing(top_k, renormalize, routing_kind, n_group, topk_group, routed_scaling_factor)
    logits = router_logits.float().contiguous()
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    with torch.cuda.device(logits.device):
        library.route(shape, routing, logits.data_ptr(), _ptr(bias), ids.data_ptr(), weights.data_ptr(),
                      torch.cuda.current_stream().cuda_stream)
    return ids, weights


@moe_route_cuda.register_fake
def _(router_logits, expert_bias, top_k, renormalize, routing_kind=0, n_group=1, topk_group=1,
      routed_scaling_factor=1.0):
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty(num_tokens, top_k, dtype=torch.int32),
            router_logits.new_empty(num_tokens, top_k, dtype=torch.float32))


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, routing: Routing, expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Convenience wrapper taking a ``Routing`` record."""
    return torch.ops.moe_compile.fused_moe_cuda(hidden, router_logits, gate_up_proj, down_proj, expert_bias,
                                               routing.top_k, routing.renormalize, int(routing.kind),
                                               routing.n_group, routing.topk_group, routing.routed_scaling_factor)


def route(router_logits: torch.Tensor, routing: Routing,
          expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.moe_compile.moe_route_cuda(router_logits, expert_bias, routing.top_k, routing.renormalize,
                                               int(routing.kind), routing.n_group, routing.topk_group,
                                               routing.routed_scaling_factor)
