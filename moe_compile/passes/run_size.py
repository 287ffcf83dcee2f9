"""How many tokens (batch x new tokens) one run of a build's graph may take.

Every tensor of a run must stay under 2^31 elements: ONNX Runtime's CUDA kernels count elements in
int32, and so do TensorRT's tensors. Seen on the H200 at the A2.7B shape: the `dense` branch's
Split of [E, 2I, T] failed at 16,384 tokens (cudaErrorInvalidValue), and `gather`, which copies
k experts' weights per token, gave logits off by 10% at 128 tokens without any error. The largest
tensor a lowering makes grows with the tokens of the run, so the limit is a token count; the decode
loop prefills in chunks under it (runtime/generate.py), and a build whose decode batch would not fit
is refused.
"""

from __future__ import annotations

import torch

from .fused import experts_arguments, layer_name

MAX_ELEMENTS = 2**31 - 1


def experts_shapes(program) -> dict[str, tuple[int, int, int, int]]:
    """Per experts module of a captured program (before lowering): (experts, gate/up rows, hidden, top-k)."""
    shapes = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.moe_compile.experts.default:
            args = experts_arguments(node)
            experts, rows, hidden = args["gate_up_proj"].meta["val"].shape
            shapes[layer_name(node)] = (int(experts), int(rows), int(hidden), int(args["top_k_index"].meta["val"].shape[-1]))
    return shapes


def elements_per_token(lowering: str, shape: tuple[int, int, int, int], threshold: int) -> int:
    """Elements of a lowering's largest tensor per token of the run (0: it makes none that grow so)."""
    experts, rows, hidden, k = shape
    gather, dense = k * rows * hidden, experts * max(rows, hidden)  # gathered gate/up [T*k, 2I, H]; [E, 2I|H, T]
    if lowering == "gather":
        return gather
    if lowering == "dense":
        return dense
    if lowering == "auto":  # gather up to the threshold, dense above it
        return dense if threshold * gather <= MAX_ELEMENTS else max(dense, gather)
    return 0  # fused: ONNX Runtime's MoE node and our plugin work per expert


def max_run_tokens(shapes: dict, layers: dict[str, str], threshold: int, attention_per_token: int) -> int | None:
    """The most tokens one run may take, or None where nothing in it grows past 2^31 elements below the
    build's sizes. `layers`: experts module -> lowering applied; `attention_per_token`: the attention scores'
    elements per token at the longest context (heads x max_seq), 0 where the graph never materialises them."""
    per_token = max([attention_per_token, *(elements_per_token(layers[name], shape, threshold)
                                            for name, shape in shapes.items() if name in layers)])
    return MAX_ELEMENTS // per_token if per_token else None
