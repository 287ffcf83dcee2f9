"""`dense`: run every expert on every token, then mix with a routing matrix zero off the top-k.

    W_gu [E,2I,H] ─MatMul xᵀ [H,T] (+ bias [E,2I,1])─▶ [E,2I,T] ─split─▶ glu(g,u) [E,I,T] ─W_down [E,H,I] MatMul─▶ y [E,H,T]
    ids, w [T,k] ─ScatterElements into zeros [T,E]─▶ R ─transpose─▶ [E,1,T]
    out = (Σ_e y · R)ᵀ                                                                        ─▶ [T,H]

Exact, static shapes, weights read once and used by all tokens: regular matmuls that stay fast
for long prefills, at E/k times the FLOPs of the selected experts alone.

The weights are MatMul's left operand in their stored layout. As the right-hand operand (x @ Wᵀ) they
become a second copy in `auto`, where the gather branch also reads them through Gather: ONNX Runtime
folds the Transpose into a new initializer, and TensorRT-RTX keeps its own copy of a right-hand
constant (bench/trt_weight_copies.py). The price: this orientation's GEMM is slower on ONNX Runtime's
CPU provider (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from .lowering import LoweringPass


def dense_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str, gate_up_bias=None,
                  down_bias=None, alpha: float = 1.0, limit: float | None = None):
    from ..capture.experts_op import glu

    h = torch.matmul(gate_up, hidden.t())  # [E, 2I, T]
    if gate_up_bias is not None:
        h = h + gate_up_bias.unsqueeze(-1)
    gate, up = h.chunk(2, dim=1)  # [E, I, T] each
    y = torch.matmul(down, glu(gate, up, activation, alpha, limit))  # [E, H, T]
    if down_bias is not None:
        y = y + down_bias.unsqueeze(-1)
    routing = torch.zeros(hidden.shape[0], gate_up.shape[0], dtype=y.dtype, device=y.device)
    routing = routing.scatter(1, top_k_index, top_k_weights.to(y.dtype))  # [T, E]
    return (y * routing.t().unsqueeze(1)).sum(dim=0).t().contiguous()  # [T, H], laid out like gather's


class DenseLowering(LoweringPass):
    name = "dense"
    description = "MoE experts -> all experts on all tokens, weighted by a scattered routing matrix (prefill-friendly)"

    def lowering(self):
        return dense_experts
