"""Driver for an Nsight Compute profile of the sampler's TopK kernels (plugins/csrc/top_k.cu): a few calls over rows
of random float32 logits, checked against torch.topk and argmax.

    ncu --clock-control none --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy --section LaunchStats -k regex:top_k -s 2 -c 2 python3 bench/ncu_top_k.py
"""

import argparse

import torch

from moe_compile.plugins import library

parser = argparse.ArgumentParser()
parser.add_argument("--vocab", type=int, default=151936, help="logits a row (default: A2.7B's vocabulary)")
parser.add_argument("--rows", type=int, default=1)
parser.add_argument("--k", type=int, default=64)
args = parser.parse_args()
rows, n, k = args.rows, args.vocab, args.k
x = torch.randn(rows, n, device="cuda")
values = torch.empty(rows, k, device="cuda")
indices = torch.empty(rows, k, dtype=torch.int64, device="cuda")
argmax = torch.empty(rows, dtype=torch.int64, device="cuda")
size = library.top_k_workspace_size(rows, n)
workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
stream = torch.cuda.current_stream().cuda_stream
for _ in range(5):
    library.top_k(x.data_ptr(), rows, n, k, values.data_ptr(), indices.data_ptr(), argmax.data_ptr(),
                  workspace.data_ptr(), size, stream)
torch.cuda.synchronize()
expected = torch.topk(x, k)
print("values as torch.topk:", torch.equal(values, expected.values), "argmax as torch:", torch.equal(argmax, x.argmax(1)))
