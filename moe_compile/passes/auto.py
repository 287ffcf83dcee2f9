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

        def auto_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str):
            def few(*args):
                return gather_experts(*args, activation)

            def many(*args):
                return dense_experts(*args, activation)

            operands = (hidden, top_k_index, top_k_weights, gate_up, down)
            return torch.cond(hidden.shape[0] <= threshold, few, many, operands)

        return auto_experts
