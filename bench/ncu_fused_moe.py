"""Driver for an Nsight Compute profile of the fused kernels: a few calls at one shape and T.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        -k regex:'decode|grouped_gemm' python3 bench/ncu_fused_moe.py qwen1.5-moe-a2.7b 1
"""

import sys

import torch

from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
from moe_compile.plugins.torch_ops import fused_moe

name, tokens = sys.argv[1], int(sys.argv[2])
shape, routing = SHAPES[name], SOFTMAX_ROUTING[name]
gate_up = (torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda") / 45).bfloat16()
down = (torch.randn(shape.num_experts, shape.hidden, shape.intermediate, device="cuda") / 38).bfloat16()
hidden = torch.randn(tokens, shape.hidden, device="cuda").bfloat16()
logits = torch.randn(tokens, shape.num_experts, device="cuda").bfloat16()
for _ in range(4):
    fused_moe(hidden, logits, gate_up, down, routing)
torch.cuda.synchronize()
