"""The C ABI's host-side contract: workspace sizing and argument checks (no GPU needed)."""

import pytest

from moe_compile.plugins import build, library
from moe_compile.plugins.library import Dtype, KernelError, Routing, RoutingKind

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")

ROUTING = Routing(RoutingKind.SOFTMAX_TOPK, top_k=4)


def test_workspace_grows_with_tokens_and_prefill_adds_expert_outputs():
    sizes = [library.workspace_size(library.shape_c(t, 2048, 1408, 60, Dtype.BF16), ROUTING) for t in (1, 16, 17, 4096)]
    assert sizes == sorted(sizes) and sizes[0] > 0
    # Past the decode threshold (16 tokens for 16-bit weights) the grouped-GEMM path also keeps y [T*K, H].
    assert sizes[2] - sizes[1] >= 17 * 4 * 2048 * 2


@pytest.mark.parametrize("shape, routing, reason", [
    ((4, 2047, 1408, 60), ROUTING, "hidden not a multiple of 8"),
    ((4, 2048, 1400 + 4, 60), ROUTING, "intermediate not a multiple of 8"),
    ((4, 2048, 1408, 2000), ROUTING, "more than 1024 experts"),
    ((4, 2048, 1408, 60), Routing(top_k=61), "top_k above E"),
    ((4, 2048, 1408, 60), Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=4, n_group=7, topk_group=2),
     "E not divisible by n_group"),
    ((4, 2048, 1408, 64), Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=9, n_group=8, topk_group=1),
     "top_k above the experts of the kept groups"),
])
def test_rejects_invalid_arguments(shape, routing, reason):
    with pytest.raises(KernelError, match="INVALID_ARGUMENT"):
        library.workspace_size(library.shape_c(*shape, Dtype.BF16), routing)


def test_gate_up_layouts():
    """Both layouts size the same workspace; an unknown layout value is refused."""
    shapes = [library.shape_c(4, 2048, 1408, 60, Dtype.BF16, layout) for layout in library.GateUpLayout]
    assert len({library.workspace_size(s, ROUTING) for s in shapes}) == 1
    with pytest.raises(KernelError, match="INVALID_ARGUMENT"):
        library.workspace_size(library.shape_c(4, 2048, 1408, 60, Dtype.BF16, 2), ROUTING)


def test_forward_rejects_a_small_workspace_before_touching_the_gpu():
    shape = library.shape_c(4, 2048, 1408, 60, Dtype.BF16)
    need = library.workspace_size(shape, ROUTING)
    with pytest.raises(KernelError, match="WORKSPACE_TOO_SMALL"):
        library.forward(shape, ROUTING, 1, 1, None, 1, 1, 1, 1, need - 1, 0)
    shared = library.SharedExpert(5632, 1, 1)
    with pytest.raises(KernelError, match="WORKSPACE_TOO_SMALL"):  # the shared expert's pieces are counted
        library.forward(shape, ROUTING, 1, 1, None, 1, 1, 1, 1, need, 0, shared)


def test_shared_expert_workspace():
    """T = 1 keeps only the shared expert's activation row ([I_s]); larger T runs it as a problem of its own
    and keeps its output [T, H] too. A shared width that is not a multiple of 8 is refused."""
    def size(tokens, shared):
        return library.workspace_size(library.shape_c(tokens, 2048, 1408, 60, Dtype.F16), ROUTING, shared)

    shared = library.SharedExpert(5632, 0, 0)
    assert size(1, None) < size(1, shared) <= size(1, None) + 5632 * 2 + 256
    assert size(64, shared) - size(64, None) >= 64 * 2048 * 2 + 64 * 5632 * 2
    with pytest.raises(KernelError, match="INVALID_ARGUMENT"):
        size(1, library.SharedExpert(5630, 0, 0))


def test_the_shared_expert_streams_with_the_routed_kernels_only_in_decode():
    """Decode: inside, up to 16 tokens for 16-bit weights (the tensor-core GEMV) and 4 for fp32 (the FMA
    GEMV's default); prefill and larger batches: apart, where the ONNX Runtime op runs it on cuBLAS
    (plugins/ort_csrc)."""
    tokens = (1, 4, 5, 8, 16, 17, 128)
    streams = {dtype: [library.streams_shared(library.shape_c(t, 2048, 1408, 60, dtype)) for t in tokens]
               for dtype in (Dtype.F16, Dtype.BF16, Dtype.F32)}
    assert streams[Dtype.F16] == streams[Dtype.BF16] == [True] * 5 + [False] * 2
    assert streams[Dtype.F32] == [True, True, False, False, False, False, False]


@pytest.mark.parametrize("k, bits, block, dtype, reason", [
    (2048, 3, 32, Dtype.F16, "3-bit codes"),
    (2048, 4, 16, Dtype.F16, "blocks of 16"),
    (2000, 4, 32, Dtype.F16, "K not a multiple of the block"),
    (2048, 4, 32, Dtype.F32, "float32 (the kernels are 16-bit)"),
])
def test_quantized_matmul_rejects_invalid_arguments(k, bits, block, dtype, reason):
    with pytest.raises(KernelError, match="INVALID_ARGUMENT"):
        library.quantized_matmul(16, 16, 16, None, 16, 1, k, 2048, bits, block, dtype, 0)


def test_decode_attention_workspace_holds_a_partial_softmax_a_split():
    """A (row, KV head) gets ceil(256 / (batch x KV heads)) splits (enough blocks for the GPU at batch 1), never
    more than max_seq's tiles of 8 KB of keys (4096 / head_dim rows; 64 below head_dim 64); each split keeps
    (P V, max, sum) in fp32 for the query heads of its group; with one split there is no workspace at all."""
    size = library.decode_attention_workspace_size  # (batch, heads, kv_heads, head_dim, max_seq)
    assert size(1, 16, 16, 128, 2048) == 1 * 16 * 16 * (128 + 2) * 4  # A2.7B: 16 splits of 64 tiles
    assert size(1, 16, 16, 128, 64) == 1 * 16 * 2 * (128 + 2) * 4  # 2 tiles of 32 rows: 2 splits
    assert size(1, 16, 16, 128, 32) == 0  # one tile: the attention launch writes the output itself
    assert size(16, 16, 16, 128, 2048) == 0  # 256 (row, KV head) pairs fill the GPU on their own
    assert size(2, 32, 8, 128, 8192) == 2 * 32 * 16 * (128 + 2) * 4
    assert size(1, 8, 1, 64, 4096) == 1 * 8 * 64 * (64 + 2) * 4  # 256 wanted, 64 tiles


@pytest.mark.parametrize("heads, kv_heads, head_dim, dtype, reason", [
    (16, 16, 96, Dtype.F16, "head size outside 16, 32, 64, 128, 256"),
    (12, 4, 128, Dtype.F16, "3 query heads a KV head"),
    (16, 16, 128, Dtype.F32, "float32 cache"),
])
def test_decode_attention_rejects_what_it_does_not_compute(heads, kv_heads, head_dim, dtype, reason):
    with pytest.raises(KernelError, match="INVALID_ARGUMENT"):
        library.decode_attention(1, (heads + 2 * kv_heads) * head_dim, None, None, 1, 1, 1, 1, 1, head_dim // 2, 1,
                                 heads, kv_heads, head_dim, 2048, 1.0, dtype, 1, 1, 1 << 20, 0)


def test_decode_attention_rejects_a_small_workspace_before_touching_the_gpu():
    need = library.decode_attention_workspace_size(1, 16, 16, 128, 2048)
    with pytest.raises(KernelError, match="WORKSPACE_TOO_SMALL"):
        library.decode_attention(1, 48 * 128, None, None, 1, 1, 1, 1, 1, 64, 1, 16, 16, 128, 2048, 1.0, Dtype.F16, 1, 1,
                                 need - 1, 0)


@pytest.mark.parametrize("rows, n, k", [(1, 100, 65), (1, 10, 20), (1, 100, 0), (70000, 100, 4)],
                         ids=["k above 64", "k above n", "k zero", "rows above a grid's y"])
def test_top_k_refuses_what_it_cannot_do_before_touching_the_gpu(rows, n, k):
    with pytest.raises(KernelError, match="moe_compile_top_k: INVALID_ARGUMENT"):
        library.top_k(1, rows, n, k, 1, 1, None, 1, 1 << 30, 0)


def test_top_k_workspace_is_a_list_of_64_candidates_a_slice():
    """A2.7B's 151936 logits in 149 slices of 1024; a longer row in at most 256 slices."""
    assert library.top_k_workspace_size(1, 151936) == 149 * 64 * 8
    assert library.top_k_workspace_size(3, 151936) == 3 * 149 * 64 * 8
    assert library.top_k_workspace_size(1, 10**6) <= 256 * 64 * 8
    with pytest.raises(KernelError, match="moe_compile_top_k: INVALID_ARGUMENT"):  # too small by one byte
        library.top_k(1, 1, 151936, 64, 1, 1, None, 1, 149 * 64 * 8 - 1, 0)
