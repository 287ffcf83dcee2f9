"""`gather`: per token, gather the selected experts' weights and run them as a batched matmul.

    x [T,H] ──expand k──▶ [T·k,H,1]
    ids [T,k] ─flatten─▶ Gather(gate_up) [T·k,2I,H] ─BMM─▶ [T·k,2I] (+ Gather(gate_up_bias)) ─split─▶ glu(g,u) [T·k,I]
                         Gather(down)    [T·k,H,I]  ─BMM─▶ [T·k,H] (+ Gather(down_bias)) ─view [T,k,H]─▶ ·w[T,k,1] ─sum k─▶ [T,H]

Exact, static shapes. Reads k experts' weights per token (copied by the Gather): cheapest when
T·k is small against the number of experts — decode. gpt-fast's MoE idiom.
"""

from __future__ import annotations

import torch

from .lowering import LoweringPass


def gather_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str, gate_up_bias=None,
                   down_bias=None, alpha: float = 1.0, limit: float | None = None):
    from ..capture.experts_op import glu

    tokens, hidden_size = hidden.shape
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    x = hidden.unsqueeze(1).expand(tokens, k, hidden_size).reshape(tokens * k, hidden_size, 1)
    h = torch.bmm(gate_up[flat], x).squeeze(-1)
    if gate_up_bias is not None:
        h = h + gate_up_bias[flat]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(down[flat], glu(gate, up, activation, alpha, limit).unsqueeze(-1)).squeeze(-1)
    if down_bias is not None:
        y = y + down_bias[flat]
    return (y.view(tokens, k, hidden_size) * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


class GatherLowering(LoweringPass):
    name = "gather"
    description = "MoE experts -> Gather selected experts' weights + batched MatMul (decode-friendly)"

    def lowering(self):
        return gather_experts
