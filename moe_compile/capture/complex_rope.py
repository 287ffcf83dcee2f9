"""RoPE in real arithmetic for families that compute it in complex numbers (DeepSeek-V2: `torch.polar`,
`view_as_complex`): ONNX has no complex type, so such a graph cannot be exported.

Scoped and declared by the family (`FamilySpec.complex_rope`): for the capture, the family's rotary
module returns (cos, sin) pairs `[B, S, d/2, 2]` instead of `polar(1, freqs)`, and its
`apply_rotary_emb(xq, xk, freqs)` multiplies each (even, odd) pair as the complex product would:
(a + ib)(c + is) = (ac - bs) + i(as + bc). Both are restored afterwards.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers.modeling_rope_utils import dynamic_rope_update


@torch.no_grad()
@dynamic_rope_update
def _rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor):
    cos, sin = freqs[..., 0].unsqueeze(1), freqs[..., 1].unsqueeze(1)  # [B, 1, S, d/2]

    def rotate(x):
        re, im = x[..., 0::2].float(), x[..., 1::2].float()  # slices, not a reshape: x is a strided view here
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).to(x.dtype)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def real_rope(model: torch.nn.Module, enabled: bool):
    if not enabled:
        yield
        return
    modeling = sys.modules[type(model).__module__]
    rotary = type(model.model.rotary_emb)
    saved = modeling.apply_rotary_emb, rotary.forward
    modeling.apply_rotary_emb, rotary.forward = _apply_rotary_emb, _rotary_forward
    try:
        yield
    finally:
        modeling.apply_rotary_emb, rotary.forward = saved
