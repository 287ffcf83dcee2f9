"""Time our GroupQueryAttention decode step (plugins/csrc/decode_attention.cu) on one GPU, as a CUDA graph replays it.

    python bench/bench_decode_attention.py [--heads 16 --kv-heads 16 --head 128] [--max-seq 4096] [--lengths 128,256,1024,4096]

Per length: the mean of 1000 replays of a CUDA graph of 20 steps (one model's layers), batch 1, fp16, and the
cache bytes the step must read (keys and values up to the length) over that time; the splits merged in the attention
launch (counters, the default of the ONNX Runtime op) and by a second launch (no counters). Next to it, for scale,
the same graph of torch's scaled_dot_product_attention on the cache up to the length (no rotary, no append: less
work)."""

import argparse

import torch
import torch.nn.functional as F

from moe_compile.plugins import library
from moe_compile.plugins.library import Dtype

LAYERS = 20  # launches a graph holds: one step's worth, so the replay's own overhead is shared


def graph_time_us(fn) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(LAYERS):
            fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(1000):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / 1000 / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head", type=int, default=128)
    parser.add_argument("--max-seq", type=int, default=4096)
    parser.add_argument("--lengths", default="128,256,1024,4096")
    args = parser.parse_args()
    heads, kv_heads, head, max_seq = args.heads, args.kv_heads, args.head, args.max_seq
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head, dtype=torch.float16, device="cuda")
    k_cache = torch.randn(1, kv_heads, max_seq, head, dtype=torch.float16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    half = head // 2
    cos = torch.randn(max_seq, half, dtype=torch.float16, device="cuda")
    sin = torch.randn_like(cos)
    out = torch.empty(1, heads * head, dtype=torch.float16, device="cuda")
    size = library.decode_attention_workspace_size(1, heads, kv_heads, head, max_seq)
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
    seqlens = torch.zeros(1, dtype=torch.int32, device="cuda")
    counters = torch.zeros(kv_heads, dtype=torch.int32, device="cuda")
    print(f"heads {heads}, kv heads {kv_heads}, head size {head}, max_seq {max_seq}, batch 1, fp16; "
          f"{torch.cuda.get_device_name()}")
    print("length | ours us, one launch | cache GB/s | ours us, two launches | torch SDPA us (no rotary/append)")
    for length in map(int, args.lengths.split(",")):
        if length > max_seq:
            continue
        seqlens.fill_(length - 1)

        def ours(merge_counters):
            library.decode_attention(qkv.data_ptr(), qkv.shape[1], None, None, k_cache.data_ptr(), v_cache.data_ptr(),
                                     seqlens.data_ptr(), cos.data_ptr(), sin.data_ptr(), half, 1, heads, kv_heads, head,
                                     max_seq, head ** -0.5, Dtype.F16, out.data_ptr(), workspace.data_ptr(), size,
                                     torch.cuda.current_stream().cuda_stream, merge_counters)

        q = qkv[:, :heads * head].view(1, heads, 1, head)
        keys, values = k_cache[:, :, :length], v_cache[:, :, :length]

        def sdpa():
            F.scaled_dot_product_attention(q, keys, values, enable_gqa=heads != kv_heads)

        one = graph_time_us(lambda: ours(counters.data_ptr()))
        two, torch_us = graph_time_us(lambda: ours(None)), graph_time_us(sdpa)
        assert not counters.any(), "the merge left a counter set"
        read = 2 * kv_heads * length * head * 2
        print(f"{length} | {one:.2f} | {read / one / 1e3:.0f} | {two:.2f} | {torch_us:.2f}")


if __name__ == "__main__":
    main()
