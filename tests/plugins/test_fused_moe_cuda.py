"""The fused MoE kernels against the float64 reference on a GPU.

Per case: fresh random inputs; a quarter of the experts made unreachable (so some get no token);
output and workspace poisoned before each run; every output element checked written; two runs
bitwise identical; routing equal to the reference except at exact near-ties.
"""

import functools

import numpy as np
import pytest
import torch

from moe_compile.plugins import library
from moe_compile.plugins.library import Dtype, RoutingKind
from moe_compile.plugins.reference import experts_reference, route_reference, shared_expert_reference

from moe_compile.plugins.model_shapes import SHAPES, SIGMOID_ROUTING, SOFTMAX_ROUTING

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOKENS = [1, 3, 16, 128, 1000, 4096]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
DTYPE_ENUM = {torch.float32: Dtype.F32, torch.float16: Dtype.F16, torch.bfloat16: Dtype.BF16}

# The decode kernels (tensor-core GEMV for 16-bit weights, FMA GEMV for fp32) or the grouped GEMM, for
# any T up to 16, by the launcher's per-call switch.
PATHS = {"decode": "16", "gemm": "0"}


@functools.lru_cache(maxsize=1)  # one shape's weights on the GPU at a time (Mixtral fp32: 5.6 GB)
def _weights(shape_name, dtype):
    s = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(1234)
    gate_up = torch.randn(s.num_experts, 2 * s.intermediate, s.hidden, device="cuda", generator=g) / s.hidden**0.5
    down = torch.randn(s.num_experts, s.hidden, s.intermediate, device="cuda", generator=g) / s.intermediate**0.5
    return gate_up.to(dtype), down.to(dtype)


def _run_kernel(hidden, logits, bias, gate_up, down, routing, layout=library.GateUpLayout.CONCATENATED, shared=None):
    """One forward through the C ABI into a NaN-poisoned output and a 0xFF-poisoned workspace."""
    num_experts, two_i, h = gate_up.shape
    shape = library.shape_c(hidden.shape[0], h, two_i // 2, num_experts, DTYPE_ENUM[hidden.dtype], layout)
    size = library.workspace_size(shape, routing, shared)
    workspace = torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")
    out = torch.full_like(hidden, float("nan"))
    library.forward(shape, routing, hidden.data_ptr(), logits.data_ptr(), None if bias is None else bias.data_ptr(),
                    gate_up.data_ptr(), down.data_ptr(), out.data_ptr(), workspace.data_ptr(), size,
                    torch.cuda.current_stream().cuda_stream, shared)
    torch.cuda.synchronize()
    return out


def _weights_for(ids, logits, routing, bias):
    """Float64 routing weights of the given choice (the reference's formula, the kernel's ids)."""
    logits = logits.double()
    if routing.kind == RoutingKind.SOFTMAX_TOPK:
        w = torch.softmax(logits, -1).gather(-1, ids)
        return (w / w.sum(-1, keepdim=True) if routing.renormalize else w) * routing.routed_scaling_factor
    w = torch.sigmoid(logits).gather(-1, ids)
    if routing.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routing.routed_scaling_factor


def _check_routing(kernel_ids, logits, routing, bias):
    ref_ids, _ = route_reference(logits, routing, bias)
    differ = (kernel_ids.sort(-1).values != ref_ids.sort(-1).values).any(-1)
    if differ.any():  # allowed only where the two choices score the same to fp32 rounding
        score = logits.double() if routing.kind == RoutingKind.SOFTMAX_TOPK else \
            torch.sigmoid(logits.double()) + (0 if bias is None else bias.double())
        a = score[differ].gather(-1, kernel_ids[differ]).sort(-1).values
        b = score[differ].gather(-1, ref_ids[differ]).sort(-1).values
        assert torch.allclose(a, b, rtol=0, atol=1e-5), f"{int(differ.sum())} tokens routed differently"
    return ref_ids


def _check_case(shape_name, num_tokens, dtype, routing):
    s = SHAPES[shape_name]
    gate_up, down = _weights(shape_name, dtype)
    torch.manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, s.hidden, device="cuda").to(dtype)
    logits = torch.randn(num_tokens, s.num_experts, device="cuda")
    logits[:, -(s.num_experts // 4):] -= 30.0  # these experts never win: they must get no token
    bias = None
    if routing.kind == RoutingKind.SIGMOID_GROUP_TOPK:
        bias = 0.1 * torch.randn(s.num_experts, device="cuda")
        bias[-(s.num_experts // 4):] = -10.0

    from moe_compile.plugins.torch_ops import route
    kernel_ids, kernel_w = route(logits, routing, bias)
    kernel_ids = kernel_ids.long()
    ref_ids = _check_routing(kernel_ids, logits, routing, bias)
    assert torch.bincount(ref_ids.flatten(), minlength=s.num_experts).eq(0).any()
    weights = _weights_for(kernel_ids, logits, routing, bias)
    torch.testing.assert_close(kernel_w.double(), weights, rtol=1e-5, atol=1e-6)

    first = _run_kernel(hidden, logits, bias, gate_up, down, routing)
    second = _run_kernel(hidden, logits, bias, gate_up, down, routing)
    assert not first.isnan().any(), f"{int(first.isnan().sum())} output elements not written"
    assert torch.equal(first.view(torch.uint8) if dtype != torch.float32 else first.view(torch.int32),
                       second.view(torch.uint8) if dtype != torch.float32 else second.view(torch.int32)), \
        "two runs differ"
    expected = experts_reference(hidden, kernel_ids, weights, gate_up, down)
    rel = ((first.double() - expected).norm() / expected.norm()).item()
    print(f"CASE {shape_name} T={num_tokens} {str(dtype).removeprefix('torch.')} {routing.kind.name} "
          f"rel_err={rel:.2e}")
    assert rel <= TOLERANCE[dtype], f"relative error {rel:.2e} > {TOLERANCE[dtype]:.0e}"

    # The torch binding runs the same kernels: same bits.
    from moe_compile.plugins.torch_ops import fused_moe
    assert torch.equal(fused_moe(hidden, logits, gate_up, down, routing, bias), first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_softmax_routing_matches_reference(shape_name, num_tokens, dtype):
    _check_case(shape_name, num_tokens, dtype, SOFTMAX_ROUTING[shape_name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape_name", list(SIGMOID_ROUTING))
def test_sigmoid_group_routing_matches_reference(shape_name, num_tokens, dtype):
    _check_case(shape_name, num_tokens, dtype, SIGMOID_ROUTING[shape_name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", [2, 8, 9, 16])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_decode_kernels_match_reference(shape_name, num_tokens, dtype, monkeypatch):
    """Both decode kernels (tensor-core GEMV for bf16: one and two n-tiles of 8 tokens; FMA GEMV for fp32)
    at every token count they take, every model shape, whatever the default crossover."""
    monkeypatch.setenv("MOE_COMPILE_DECODE_MAX_TOKENS", PATHS["decode"])
    _check_case(shape_name, num_tokens, dtype, SOFTMAX_ROUTING[shape_name])


def test_fake_kernel_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import moe_compile.plugins.torch_ops  # noqa: F401  (registers the op)
    with FakeTensorMode():
        out = torch.ops.moe_compile.fused_moe_cuda(torch.empty(5, 64, device="cuda"), torch.empty(5, 8, device="cuda"),
                                                   torch.empty(8, 32, 64, device="cuda"),
                                                   torch.empty(8, 64, 16, device="cuda"), None, 2, True)
    assert out.shape == (5, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 1000])
def test_interleaved_gate_up_gives_the_same_bits(num_tokens, dtype):
    """com.microsoft:MoE stores gate/up rows interleaved (g0, u0, g1, ...); the TensorRT plugin
    passes that layout straight to the kernels. Same products in the same order: same bits, on
    the decode (T <= 16 in bf16, 4 in fp32), grouped-GEMM and fp32 paths."""
    name = "qwen1.5-moe-a2.7b"
    s, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gate_up, down = _weights(name, dtype)
    interleaved = gate_up.view(s.num_experts, 2, s.intermediate, s.hidden).transpose(1, 2).reshape(gate_up.shape)
    torch.manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, s.hidden, device="cuda").to(dtype)
    logits = torch.randn(num_tokens, s.num_experts, device="cuda")
    concatenated = _run_kernel(hidden, logits, None, gate_up, down, routing)
    got = _run_kernel(hidden, logits, None, interleaved.contiguous(), down, routing, library.GateUpLayout.INTERLEAVED)
    assert not got.isnan().any(), f"{int(got.isnan().sum())} output elements not written"
    assert torch.equal(got, concatenated)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 9, 16, 300])
def test_shared_expert_matches_reference(num_tokens, dtype, path, gated, monkeypatch):
    """Qwen1.5-MoE-A2.7B's shared expert (I_s = 5632 = 4 routed widths) beside its routed experts, on every
    path: inside the decode kernels (tensor-core GEMV up to 16 tokens, 8 per n-tile; FMA GEMV up to 8), after
    the grouped GEMM, and as a one-expert problem of its own beyond; against the float64 reference, every
    element written, two runs bitwise identical. At T = 1 the in-kernel and the grouped-GEMM path agree."""
    monkeypatch.setenv("MOE_COMPILE_DECODE_MAX_TOKENS", PATHS[path])
    name = "qwen1.5-moe-a2.7b"
    s, routing = SHAPES[name], SOFTMAX_ROUTING[name]
    gate_up, down = _weights(name, dtype)
    g = torch.Generator(device="cuda").manual_seed(99)
    shared_i = 4 * s.intermediate
    shared_gate_up = (torch.randn(2 * shared_i, s.hidden, device="cuda", generator=g) / s.hidden**0.5).to(dtype)
    shared_down = (torch.randn(s.hidden, shared_i, device="cuda", generator=g) / shared_i**0.5).to(dtype)
    torch.manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, s.hidden, device="cuda").to(dtype)
    logits = torch.randn(num_tokens, s.num_experts, device="cuda")
    gate_logits = torch.randn(num_tokens, device="cuda") * 2 if gated else None
    shared = library.SharedExpert(shared_i, shared_gate_up.data_ptr(), shared_down.data_ptr(),
                                  None if gate_logits is None else gate_logits.data_ptr())

    first = _run_kernel(hidden, logits, None, gate_up, down, routing, shared=shared)
    second = _run_kernel(hidden, logits, None, gate_up, down, routing, shared=shared)
    assert not first.isnan().any(), f"{int(first.isnan().sum())} output elements not written"
    assert torch.equal(first, second), "two runs differ"
    ids, weights = route_reference(logits, routing)
    expected = experts_reference(hidden, ids, weights, gate_up, down) + \
        shared_expert_reference(hidden, shared_gate_up, shared_down, gate_logits)
    rel = ((first.double() - expected).norm() / expected.norm()).item()
    print(f"CASE shared T={num_tokens} {str(dtype).removeprefix('torch.')} gated={gated} rel_err={rel:.2e}")
    assert rel <= TOLERANCE[dtype], f"relative error {rel:.2e} > {TOLERANCE[dtype]:.0e}"
    if num_tokens == 1 and path != "gemm":
        monkeypatch.setenv("MOE_COMPILE_DECODE_MAX_TOKENS", "0")  # the separate (grouped GEMM) path
        apart = _run_kernel(hidden, logits, None, gate_up, down, routing, shared=shared)
        rel_apart = ((apart.double() - expected).norm() / expected.norm()).item()
        assert rel_apart <= TOLERANCE[dtype]
        assert ((apart.double() - first.double()).norm() / expected.norm()).item() <= TOLERANCE[dtype]



@functools.lru_cache(maxsize=12)
def _quantized(bits, block, dtype):
    """Qwen1.5-MoE-A2.7B's expert shape (16 of its experts), gate/up rows interleaved as com.microsoft:QMoE
    holds them, quantized by the build's own quantizer (quantize/packing.py) with the scales in `dtype` as a
    build stores them: ([codes gate_up, scales, codes down, scales] on the GPU, and the weights they stand
    for by packing's reference dequantizer: gate_up [E, 2I, H] with gate rows, then up rows; down [E, H, I])."""
    import numpy as np

    from moe_compile.quantize.packing import Blockwise, qmoe_weights, quantize_rows
    e, h, i = 16, 2048, 1408
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(e, i, 2, h, generator=g) / h**0.5  # (g0, u0, g1, u1, ...)
    down = torch.randn(e, h, i, generator=g) / i**0.5
    parts, weights = [], []
    for w in (gate_up.reshape(e, 2 * i, h), down):
        q = quantize_rows(w.numpy(), bits, block, np.float32)
        q.scales = torch.from_numpy(q.scales).to(dtype).float().numpy()
        codes, scales = qmoe_weights(q)
        parts += [torch.from_numpy(np.ascontiguousarray(codes)).cuda(), torch.from_numpy(scales).to(dtype).cuda()]
        weights.append(torch.from_numpy(q.dequantize()).cuda())
    concatenated = weights[0].view(e, i, 2, h).transpose(1, 2).reshape(e, 2 * i, h)
    return parts, concatenated, weights[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32), (8, 64)], ids=["int4-b32", "int4-b128", "int8-b32",
                                                                                   "int8-b64"])
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 9, 16, 40])
def test_quantized_experts_match_their_dequantized_weights(num_tokens, bits, block, dtype):
    """Block-quantized experts (com.microsoft:QMoE's layout, the codes our quantizer writes) against the float64
    reference on the same weights dequantized: the decode kernels reading the codes (16-bit, T <= 16: one and
    two n-tiles of 8 tokens; T = 1 routing inside the gate/up launch) and the dequantize-then-float path (T = 40,
    and fp32); every element written, two runs bitwise identical, the torch op the same bits."""
    _check_quantized(num_tokens, bits, block, dtype, library.Routing(RoutingKind.SOFTMAX_TOPK, top_k=4, renormalize=False))


@pytest.mark.parametrize("routing", [library.Routing(RoutingKind.SOFTMAX_TOPK, top_k=4, renormalize=True),
                                     library.Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=4, renormalize=True, n_group=4,
                                                     topk_group=2, routed_scaling_factor=2.5)],
                         ids=["softmax-renormalized", "sigmoid-groups-bias"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_quantized_decode_routes_every_kind(num_tokens, routing):
    """The other routings (renormalised softmax; grouped sigmoid with a selection bias, DeepSeek-style) through the
    quantized decode path: at T = 1 the gate/up launch routes the token itself, at T = 3 the routing launch does."""
    _check_quantized(num_tokens, 4, 32, torch.float16, routing)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("num_tokens", [1, 3, 9, 16, 40])
def test_quantized_shared_expert_matches_reference(num_tokens, bits, dtype):
    """A2.7B's shared expert (I_s = 5632) quantized as com.microsoft:MatMulNBits holds it (gate rows then up rows,
    [N, K/block, block·bits/8] codes), gated by its own logit, beside the quantized routed experts: in the
    decode launches up to 16 tokens (T = 1 with the routing inside), dequantized with the experts at 40."""
    _check_quantized(num_tokens, bits, 32, dtype, library.Routing(RoutingKind.SOFTMAX_TOPK, top_k=4, renormalize=False),
                     shared=True)


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_quantized_one_token_is_the_same_with_the_down_launch_serialised(bits, monkeypatch):
    """At T = 1 the down launch starts as the gate/up launch's programmatic dependent (sm_90+) and waits for it only
    before it reads act; serialised (MOE_COMPILE_PROGRAMMATIC_LAUNCH=0) the output must be the same bits."""
    routing = library.Routing(RoutingKind.SOFTMAX_TOPK, top_k=4, renormalize=False)
    early = _check_quantized(1, bits, 32, torch.float16, routing, shared=True)
    monkeypatch.setenv("MOE_COMPILE_PROGRAMMATIC_LAUNCH", "0")
    serialised = _check_quantized(1, bits, 32, torch.float16, routing, shared=True)
    assert torch.equal(early, serialised)


@functools.lru_cache(maxsize=4)
def _quantized_shared(bits, block, dtype):
    """(codes gate_up, scales, codes down, scales) on the GPU, and the dequantized gate_up [2I_s, H] and down
    [H, I_s] they stand for."""
    import numpy as np

    from moe_compile.quantize.packing import quantize_rows
    h, i_s = 2048, 5632
    g = torch.Generator().manual_seed(11)
    parts, weights = [], []
    for w in (torch.randn(2 * i_s, h, generator=g) / h**0.5, torch.randn(h, i_s, generator=g) / i_s**0.5):
        q = quantize_rows(w.numpy(), bits, block, np.float32)
        q.scales = torch.from_numpy(q.scales).to(dtype).float().numpy()
        parts += [torch.from_numpy(q.codes).cuda(), torch.from_numpy(q.scales).to(dtype).cuda()]
        weights.append(torch.from_numpy(q.dequantize()).cuda())
    return parts, weights[0], weights[1]


def _check_quantized(num_tokens, bits, block, dtype, routing, shared=False):
    from moe_compile.plugins.torch_ops import fused_moe_quantized_cuda

    codes, gate_up, down = _quantized(bits, block, dtype)
    num_experts, two_i, hidden_size = gate_up.shape
    torch.manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, device="cuda").to(dtype)
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    logits[:, -4:] -= 30.0  # experts with no token
    bias = None
    if routing.kind == RoutingKind.SIGMOID_GROUP_TOPK:
        bias = 0.1 * torch.randn(num_experts, device="cuda")
        bias[-4:] = -10.0
    shared_expert, shared_scales = None, {}
    if shared:
        shared_codes, shared_gate_up, shared_down = _quantized_shared(bits, block, dtype)
        gate_logits = torch.randn(num_tokens, device="cuda") * 2
        shared_expert = library.SharedExpert(shared_down.shape[1], shared_codes[0].data_ptr(), shared_codes[2].data_ptr(),
                                             gate_logits.data_ptr())
        shared_scales = {"shared_gate_up_scales": shared_codes[1].data_ptr(),
                         "shared_down_scales": shared_codes[3].data_ptr()}

    def run():
        shape = library.shape_c(num_tokens, hidden_size, two_i // 2, num_experts, DTYPE_ENUM[dtype],
                                library.GateUpLayout.INTERLEAVED)
        quant = library.QuantizedExperts(bits, block, codes[1].data_ptr(), codes[3].data_ptr(), **shared_scales)
        size = library.workspace_size_quantized(shape, routing, quant, shared_expert)
        workspace = torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")
        out = torch.full_like(hidden, float("nan"))
        library.forward_quantized(shape, routing, quant, hidden.data_ptr(), logits.data_ptr(),
                                  None if bias is None else bias.data_ptr(), codes[0].data_ptr(), codes[2].data_ptr(),
                                  out.data_ptr(), workspace.data_ptr(), size, torch.cuda.current_stream().cuda_stream,
                                  shared_expert)
        torch.cuda.synchronize()
        return out

    first, second = run(), run()
    assert not first.isnan().any(), f"{int(first.isnan().sum())} output elements not written"
    assert torch.equal(first, second), "two runs differ"
    ids, weights = route_reference(logits, routing, bias)
    expected = experts_reference(hidden, ids, weights, gate_up, down)
    if shared:
        expected = expected + shared_expert_reference(hidden, shared_gate_up, shared_down, gate_logits)
    rel = ((first.double() - expected).norm() / expected.norm()).item()
    print(f"CASE quantized int{bits} block {block} T={num_tokens} {str(dtype).removeprefix('torch.')} "
          f"{routing.kind.name} shared={shared} rel_err={rel:.2e}")
    assert rel <= TOLERANCE[dtype], f"relative error {rel:.2e} > {TOLERANCE[dtype]:.0e}"
    if routing.kind == RoutingKind.SOFTMAX_TOPK and not shared:  # the torch op: softmax routing, no shared expert
        got = fused_moe_quantized_cuda(hidden, logits, *codes, bits, block, routing.top_k, routing.renormalize)
        assert torch.equal(got, first)
    return first


@functools.lru_cache(maxsize=8)
def _quantized_matrix(n, k, bits, block, dtype):
    """(codes [N, K*bits/8], scales [N, K/block] in `dtype`) on the GPU, as com.microsoft:MatMulNBits holds a weight
    our quantizer wrote, and the weight [N, K] they stand for."""
    import numpy as np

    from moe_compile.quantize.packing import quantize_rows
    g = torch.Generator().manual_seed(n + k + bits + block)
    q = quantize_rows((torch.randn(n, k, generator=g) / k**0.5).numpy(), bits, block, np.float32)
    q.scales = torch.from_numpy(q.scales).to(dtype).float().numpy()
    weight = torch.from_numpy(q.dequantize()).cuda()
    return torch.from_numpy(q.codes).cuda(), torch.from_numpy(q.scales).to(dtype).cuda(), weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32), (8, 64)], ids=["int4-b32", "int4-b128", "int8-b32",
                                                                                   "int8-b64"])
@pytest.mark.parametrize("rows,n,k", [(1, 6144, 2048), (1, 200, 384), (3, 2048, 2048), (8, 200, 384), (9, 2048, 2048),
                                      (16, 200, 384), (40, 200, 384), (128, 2048, 2048)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_quantized_matmul_matches_its_dequantized_weight(rows, n, k, bits, block, dtype, with_bias):
    """The dense quantized matmul (a quantized build's projections on ort-cuda) against the float64 product with the
    same weight dequantized: one and two n-tiles, token chunks of 16 (40, 128 rows), rows past a last partial
    group of 16 (N = 200), slices of K that end early (K = 384); every element written, two runs the same bits, the
    torch op the same bits."""
    from moe_compile.plugins.torch_ops import quantized_matmul_cuda

    codes, scales, weight = _quantized_matrix(n, k, bits, block, dtype)
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None

    def run():
        y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
        library.quantized_matmul(x.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                                 None if bias is None else bias.data_ptr(), y.data_ptr(), rows, k, n, bits, block,
                                 DTYPE_ENUM[dtype], torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return y

    first, second = run(), run()
    assert not first.isnan().any(), f"{int(first.isnan().sum())} output elements not written"
    assert torch.equal(first, second), "two runs differ"
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    rel = ((first.double() - expected).norm() / expected.norm()).item()
    print(f"CASE quantized matmul int{bits} block {block} M={rows} N={n} K={k} {dtype} bias={with_bias} rel_err={rel:.2e}")
    assert rel <= TOLERANCE[dtype], f"relative error {rel:.2e} > {TOLERANCE[dtype]:.0e}"
    assert torch.equal(quantized_matmul_cuda(x, codes, scales, bias, bits, block), first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head, heads, kv_heads", [(128, 16, 16), (64, 32, 4), (16, 4, 2), (32, 16, 1), (256, 8, 8),
                                                   (128, 32, 8)])
@pytest.mark.parametrize("max_seq", [48, 200, 4096])
@pytest.mark.parametrize("merge", ["one_launch", "two_launches"])
def test_decode_attention_matches_the_reference(dtype, head, heads, kv_heads, max_seq, merge):
    """GroupQueryAttention's decode step (rotary on the first half of the dims, the token appended in place, one or
    many 64-row chunks) against the float64 reference; past and present one buffer, then two (the past copied); the
    splits merged by the last one to finish (counters, which it leaves zero for the next call) or by a second launch."""
    from moe_compile.plugins.reference import decode_attention_reference

    torch.manual_seed(head + heads + max_seq)
    batch, rotary_half = 3, head // 4
    lengths = torch.tensor([1, max_seq // 2 + 3, max_seq], dtype=torch.int32)[:batch]
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head, dtype=dtype, device="cuda")
    k_cache = torch.randn(batch, kv_heads, max_seq, head, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    angles = torch.arange(max_seq)[:, None] * (1e4 ** (-torch.arange(rotary_half) / rotary_half))[None]
    cos, sin = angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()
    seqlens = (lengths - 1).cuda()
    expected, expected_k, expected_v = decode_attention_reference(qkv.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu(),
                                                                  cos.cpu(), sin.cpu(), heads, 0.7 / head ** 0.5)
    bytes_ = library.decode_attention_workspace_size(batch, heads, kv_heads, head, max_seq)
    workspace = torch.empty(max(bytes_, 1), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    kind = Dtype.F16 if dtype == torch.float16 else Dtype.BF16
    counters = torch.zeros(batch * kv_heads, dtype=torch.int32, device="cuda")
    for shared in (True, False):
        past_k, past_v = k_cache.clone(), v_cache.clone()
        present_k, present_v = (past_k, past_v) if shared else (torch.empty_like(past_k), torch.empty_like(past_v))
        out = torch.full((batch, heads * head), float("nan"), dtype=dtype, device="cuda")
        library.decode_attention(qkv.data_ptr(), qkv.shape[1], past_k.data_ptr(), past_v.data_ptr(),
                                 present_k.data_ptr(), present_v.data_ptr(), seqlens.data_ptr(), cos.data_ptr(),
                                 sin.data_ptr(), rotary_half, batch, heads, kv_heads, head, max_seq, 0.7 / head ** 0.5,
                                 kind, out.data_ptr(), workspace.data_ptr(), bytes_, stream,
                                 counters.data_ptr() if merge == "one_launch" else None)
        torch.cuda.synchronize()
        assert not counters.any(), "a merge counter left set: the next call would merge early"
        tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(present_k.cpu().float(), expected_k.float(), atol=tolerance, rtol=0)
        assert torch.equal(present_v.cpu(), expected_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens,hidden,experts,gate", [(1, 2048, 60, True), (1, 2048, 60, False), (9, 4096, 8, False),
                                                      (128, 2048, 60, True), (3, 24, 5, True), (2, 7168, 256, False)])
def test_router_logits_are_the_router_matmul_rounded_to_its_dtype(tokens, hidden, experts, gate, dtype):
    """The router's logits from its weight rows (what the ort-cuda swap's folded router MatMul runs): the product in
    float64, rounded to the dtype as the MatMul's output is, within the rounding of one step of it (the sums' order
    differs); the gate row's logit apart; rows past several rounds of loads (H = 7168) and past a partial one (H = 24);
    NaN-poisoned outputs all written; two runs the same bits."""
    torch.manual_seed(tokens * hidden + experts)
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    rows = (torch.randn(experts + gate, hidden, device="cuda") / hidden**0.5).to(dtype)

    def run():
        logits = torch.full((tokens, experts), float("nan"), device="cuda")
        gate_logits = torch.full((tokens,), float("nan"), device="cuda") if gate else None
        library.router_logits(x.data_ptr(), rows.data_ptr(), DTYPE_ENUM[dtype], tokens, hidden, experts,
                              logits.data_ptr(), None if gate_logits is None else gate_logits.data_ptr(),
                              torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return logits if gate_logits is None else torch.cat([logits, gate_logits[:, None]], dim=1)

    first, second = run(), run()
    assert not first.isnan().any(), f"{int(first.isnan().sum())} logits not written"
    assert torch.equal(first, second), "two runs differ"
    assert torch.equal(first, first.to(dtype).float()), "logits not rounded to the dtype"
    expected = x.double() @ rows.double().T
    step = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    assert ((first.double() - expected).abs() <= step * expected.abs() + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 9, 128])
@pytest.mark.parametrize("hidden", [2048, 24, 4096])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_sum", [False, True], ids=["no-sum", "sum"])
def test_skip_rms_norm_is_onnxruntimes_rounded_to_its_dtype(dtype, rows, hidden, with_bias, with_sum):
    """com.microsoft:SkipSimplifiedLayerNormalization's contract (what the ort-cuda swap's norm runs): the sum
    input (+ bias) + skip rounded to the dtype after each addition, bitwise; the norm against float64 on that sum
    within one step of the dtype's rounding; rows of one partial warp's loads (H = 24) and of more than 256 threads;
    NaN-poisoned outputs all written; two runs the same bits."""
    torch.manual_seed(rows * hidden + with_bias)
    x, skip = (torch.randn(rows, hidden, device="cuda").to(dtype) for _ in range(2))
    gamma = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(hidden, device="cuda")).to(dtype) if with_bias else None
    epsilon = 1e-6

    def run():
        out = torch.full_like(x, float("nan"))
        total = torch.full_like(x, float("nan")) if with_sum else None
        library.skip_rms_norm(x.data_ptr(), skip.data_ptr(), None if bias is None else bias.data_ptr(),
                              gamma.data_ptr(), DTYPE_ENUM[dtype], rows, hidden, epsilon, out.data_ptr(),
                              None if total is None else total.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return out, total

    (first, first_sum), (second, second_sum) = run(), run()
    assert not first.isnan().any(), f"{int(first.isnan().sum())} outputs not written"
    assert torch.equal(first, second), "two runs differ"
    expected_sum = x if bias is None else (x.float() + bias.float()).to(dtype)
    expected_sum = (expected_sum.float() + skip.float()).to(dtype)
    if with_sum:
        assert torch.equal(first_sum, expected_sum) and torch.equal(second_sum, first_sum)
    s = expected_sum.double()
    expected = s * torch.rsqrt(s.square().mean(dim=1, keepdim=True) + epsilon) * gamma.double()
    step = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert ((first.double() - expected).abs() <= step * expected.abs() + 1e-6).all()


@pytest.mark.parametrize("rows,n,k", [(1, 151936, 64), (3, 151936, 64), (2, 64, 64), (4, 100, 8), (1, 5000, 1),
                                      (2, 300000, 64), (8, 32000, 50)])
@pytest.mark.parametrize("values", ["normal", "ties", "specials"])
def test_top_k_is_onnx_top_k_and_arg_max(rows, n, k, values):
    """The sampler's candidates against a stable sort of each row: the k largest, best first, ties to the lower index
    (ONNX TopK's order; "ties": values on a grid of halves, so most of the 64 tie), and the argmax their first; -inf
    entries ("specials") rank below every number and above nothing, a NaN above every number (it shows in the
    candidates); outputs NaN-poisoned before the run, two runs the same bits."""
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, n, device="cuda") * 4
    if values == "ties":
        x = (x * 2).round() / 2
    if values == "specials":
        x[:, torch.randperm(n)[: n // 2]] = float("-inf")
        x[0, n // 3] = float("nan")
    workspace = torch.empty(library.top_k_workspace_size(rows, n), dtype=torch.uint8, device="cuda")

    def run():
        top = torch.full((rows, k), float("nan"), device="cuda")
        ids = torch.full((rows, k), -1, dtype=torch.int64, device="cuda")
        argmax = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
        library.top_k(x.data_ptr(), rows, n, k, top.data_ptr(), ids.data_ptr(), argmax.data_ptr(), workspace.data_ptr(),
                      workspace.numel(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return top.cpu(), ids.cpu(), argmax.cpu()

    (top, ids, argmax), second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip((top.nan_to_num(7.0), ids, argmax), (second[0].nan_to_num(7.0),
                                                                                     *second[1:]))), "two runs differ"
    host = x.cpu().numpy()
    order = np.argsort(-np.nan_to_num(host, nan=np.inf), axis=-1, kind="stable")[:, :k]  # NaN first, then by value
    assert np.array_equal(ids.numpy(), order)
    assert torch.equal(top.nan_to_num(7.0), torch.from_numpy(np.take_along_axis(host, order, -1)).nan_to_num(7.0))
    assert torch.equal(argmax, ids[:, 0])


def test_one_launch_decode_attention_is_one_kernel():
    """With counters the splits merge inside the attention launch: the profiler sees one kernel a call, where the
    two-launch merge shows the combine kernel too (the test fails if the merge ever launches beside the counters)."""
    from torch.profiler import ProfilerActivity, profile

    batch, heads, kv_heads, head, max_seq = 1, 16, 16, 128, 4096
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head, dtype=torch.float16, device="cuda")
    k_cache = torch.randn(batch, kv_heads, max_seq, head, dtype=torch.float16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), max_seq - 1, dtype=torch.int32, device="cuda")
    bytes_ = library.decode_attention_workspace_size(batch, heads, kv_heads, head, max_seq)
    workspace = torch.empty(bytes_, dtype=torch.uint8, device="cuda")
    out = torch.empty(batch, heads * head, dtype=torch.float16, device="cuda")
    counters = torch.zeros(batch * kv_heads, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def kernels(with_counters: bool) -> list[str]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            library.decode_attention(qkv.data_ptr(), qkv.shape[1], k_cache.data_ptr(), v_cache.data_ptr(),
                                     k_cache.data_ptr(), v_cache.data_ptr(), seqlens.data_ptr(), None, None, 0, batch,
                                     heads, kv_heads, head, max_seq, head ** -0.5, Dtype.F16, out.data_ptr(),
                                     workspace.data_ptr(), bytes_, stream,
                                     counters.data_ptr() if with_counters else None)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    two = kernels(False)
    assert len(two) == 2 and any("combine" in name for name in two), two
    one = kernels(True)
    assert len(one) == 1 and "decode_attention" in one[0], one
