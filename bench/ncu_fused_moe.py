"""Driver for an Nsight Compute profile of the fused kernels: a few calls at one shape and T.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        -k regex:'decode|grouped_gemm' python3 bench/ncu_fused_moe.py qwen1.5-moe-a2.7b 1
    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        -k regex:'mma_' python3 bench/ncu_fused_moe.py qwen1.5-moe-a2.7b 1 --quantized 4

--quantized BITS: the experts as int4/int8 codes (random, block 32, fp16 scales and activations) with the model's
shared expert (A2.7B: I_s = 5632, gated) in the same launches, as `moe_compile:FusedQMoE` runs them.
"""

import argparse

import torch

from moe_compile.plugins import library
from moe_compile.plugins.library import Dtype, GateUpLayout
from moe_compile.plugins.model_shapes import SHAPES, SOFTMAX_ROUTING
from moe_compile.plugins.torch_ops import fused_moe

parser = argparse.ArgumentParser()
parser.add_argument("shape")
parser.add_argument("tokens", type=int)
parser.add_argument("--quantized", type=int, choices=(4, 8), default=None)
args = parser.parse_args()
shape, routing = SHAPES[args.shape], SOFTMAX_ROUTING[args.shape]
e, h, i, t = shape.num_experts, shape.hidden, shape.intermediate, args.tokens
if args.quantized is None:
    gate_up = (torch.randn(e, 2 * i, h, device="cuda") / 45).bfloat16()
    down = (torch.randn(e, h, i, device="cuda") / 38).bfloat16()
    hidden = torch.randn(t, h, device="cuda").bfloat16()
    logits = torch.randn(t, e, device="cuda").bfloat16()
    for _ in range(4):
        fused_moe(hidden, logits, gate_up, down, routing)
else:
    bits, block, shared_i = args.quantized, 32, 4 * i

    def codes(rows, k):
        return (torch.randint(0, 256, (rows, k * bits // 8), dtype=torch.uint8, device="cuda"),
                (torch.rand(rows, k // block, device="cuda") / 100).half())

    (gu, gu_s), (d, d_s) = codes(e * 2 * i, h), codes(e * h, i)
    (sgu, sgu_s), (sd, sd_s) = codes(2 * shared_i, h), codes(h, shared_i)
    hidden = torch.randn(t, h, device="cuda").half()
    logits, gate_logits = torch.randn(t, e, device="cuda"), torch.randn(t, device="cuda")
    c_shape = library.shape_c(t, h, i, e, Dtype.F16, GateUpLayout.INTERLEAVED)
    shared = library.SharedExpert(shared_i, sgu.data_ptr(), sd.data_ptr(), gate_logits.data_ptr())
    quant = library.QuantizedExperts(bits, block, gu_s.data_ptr(), d_s.data_ptr(), sgu_s.data_ptr(), sd_s.data_ptr())
    size = library.workspace_size_quantized(c_shape, routing, quant, shared)
    workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(hidden)
    for _ in range(4):
        library.forward_quantized(c_shape, routing, quant, hidden.data_ptr(), logits.data_ptr(), None, gu.data_ptr(),
                                  d.data_ptr(), out.data_ptr(), workspace.data_ptr(), size,
                                  torch.cuda.current_stream().cuda_stream, shared)
torch.cuda.synchronize()
