"""`auto`: an ONNX `If` on the token count choosing `gather` (few tokens) or `dense` (many).

    T = rows of x ─LessOrEqual(threshold)─▶ If ─then─▶ gather subgraph
                                               └else─▶ dense subgraph

Written as `torch.cond`, which the ONNX exporter turns into `If`. The threshold is the token
count up to which gathering weights per token beats computing all experts; it is recorded in
the manifest.
"""

from __future__ import annotations

import torch

from .dense import dense_experts
from .gather import gather_experts
from .lowering import LoweringPass

DEFAULT_THRESHOLD = 8


class AutoLowering(LoweringPass):
    name = "auto"
    description = "MoE experts -> If(tokens <= threshold, gather, dense)"

    def lowering(self):
        threshold = int(self.options.get("auto_threshold", DEFAULT_THRESHOLD))

        def auto_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str, gate_up_bias=None,
                         down_bias=None, alpha: float = 1.0, limit: float | None = None):
            # torch.cond takes tensors only: absent biases stay out of the operands.
            biases = [b for b in (gate_up_bias, down_bias) if b is not None]
            has = (gate_up_bias is not None, down_bias is not None)

            def unpack(args):
                rest = iter(args[5:])
                return (*args[:5], activation, *(next(rest) if h else None for h in has), alpha, limit)

            def few(*args):
                return gather_experts(*unpack(args))

            def many(*args):
                return dense_experts(*unpack(args))

            operands = (hidden, top_k_index, top_k_weights, gate_up, down, *biases)
            return torch.cond(hidden.shape[0] <= threshold, few, many, operands)

        return auto_experts
