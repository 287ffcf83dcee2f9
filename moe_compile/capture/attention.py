"""The attention function used while capturing, registered in transformers' AttentionInterface.

transformers' own `sdpa` function branches on the query length (a GQA packing path for one
token, an `is_causal` shortcut for several), which under export becomes guards that pin the
sequence length. This one has no shape branches: the additive mask from the decoder step
carries causality and padding, and grouped KV heads are repeated explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATION = "moe_compile"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # a Python int from the weights' shapes, not a traced size
        batch, heads, length, dim = key.shape
        key = key[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)
        value = value[:, :, None].expand(batch, heads, groups, length, value.shape[-1])
        value = value.reshape(batch, heads * groups, length, -1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)


_register()
