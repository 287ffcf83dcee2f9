"""Replace the loaded model's quantized weights by their dequantized values, one tensor at a time.

Run before capture, this makes the captured program the dequantized reference of the build: the
ONNX rewrite (onnx_rewrite.py) later quantizes the same values again and gets the same codes (a
dequantized block's largest magnitude is its scale times the largest code, so the scale and every code
come back unchanged). Peak extra memory: one slab of rows in fp32 at a time (packing.row_slabs).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from . import Quantization, weight_class
from .packing import quantize_rows, row_slabs

log = logging.getLogger("moe_compile.quantize")


def quantized_weights(model: torch.nn.Module, quantization: Quantization):
    """(name, parameter, K axis) of every weight the build quantizes: nn.Linear weights of quantized
    classes ([N, K]) and the experts modules' gate_up/down ([E, N, K], or [E, K, N] when transposed)."""
    from ..capture.experts_op import experts_modules

    for path, module in experts_modules(model).items():
        if quantization.quantizes(weight_class(path)):
            k_axis = 1 if getattr(module, "is_transposed", False) else 2
            for name in ("gate_up_proj", "down_proj"):
                yield f"{path}.{name}", getattr(module, name), k_axis
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and quantization.quantizes(weight_class(path)):
            yield f"{path}.weight", module.weight, 1


@torch.no_grad()
def fake_quantize(model: torch.nn.Module, quantization: Quantization) -> dict[str, int]:
    """Dequantize(quantize(w)) in place for every quantized weight; returns how many per class. A weight
    whose K is not a multiple of the block size is refused (check_config catches the usual ones first)."""
    counts: Counter = Counter()
    seen = set()
    for name, weight, k_axis in quantized_weights(model, quantization):
        if id(weight) in seen:  # tied weights
            continue
        seen.add(id(weight))
        rows = weight.detach().movedim(k_axis, -1)  # [..., N, K], a view
        for _, _, slab in row_slabs(rows if rows.dim() == 3 else rows.unsqueeze(0)):
            q = quantize_rows(slab.float().numpy(), quantization.bits, quantization.block_size, "float32",
                              scales=quantization.scales, stored=slab.dtype)
            slab.copy_(torch.from_numpy(q.dequantize()))
        counts[weight_class(name.rsplit(".", 1)[0])] += 1
    log.info("[quantize] %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return dict(counts)
