"""`dense`: run every expert on every token, then mix with a routing matrix zero off the top-k.

    x [T,H] ─MatMul gate_upᵀ [E,H,2I] (+ bias [E,1,2I])─▶ [E,T,2I] ─split─▶ glu(g,u) [E,T,I] ─MatMul downᵀ (+ bias)─▶ y [E,T,H]
    ids, w [T,k] ─ScatterElements into zeros [T,E]─▶ R ─transpose─▶ [E,T,1]
    out = Σ_e y · R                                                               ─▶ [T,H]

Exact, static shapes, weights read once and used by all tokens: regular matmuls that stay fast
for long prefills, at E/k times the FLOPs of the selected experts alone.
"""

from __future__ import annotations

import torch

from .lowering import LoweringPass


def dense_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str, gate_up_bias=None,
                  down_bias=None, alpha: float = 1.0, limit: float | None = None):
    from ..capture.experts_op import glu

    h = torch.matmul(hidden, gate_up.transpose(1, 2))  # [E, T, 2I]
    if gate_up_bias is not None:
        h = h + gate_up_bias.unsqueeze(1)
    gate, up = h.chunk(2, dim=-1)  # [E, T, I] each
    y = torch.matmul(glu(gate, up, activation, alpha, limit), down.transpose(1, 2))  # [E, T, H]
    if down_bias is not None:
        y = y + down_bias.unsqueeze(1)
    routing = torch.zeros(hidden.shape[0], gate_up.shape[0], dtype=y.dtype, device=y.device)
    routing = routing.scatter(1, top_k_index, top_k_weights.to(y.dtype))  # [T, E]
    return (y * routing.t().unsqueeze(-1)).sum(dim=0)


class DenseLowering(LoweringPass):
    name = "dense"
    description = "MoE experts -> all experts on all tokens, weighted by a scattered routing matrix (prefill-friendly)"

    def lowering(self):
        return dense_experts
