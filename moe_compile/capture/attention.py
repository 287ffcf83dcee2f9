"""The attention function used while capturing, registered in transformers' AttentionInterface.

transformers' own `sdpa` function branches on the query length (a GQA packing path for one
token, an `is_causal` shortcut for several), which under export becomes guards that pin the
sequence length. This one has no shape branches: the additive mask from the decoder step
carries causality, padding and sliding windows, and grouped KV heads are repeated explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATION = "moe_compile"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, s_aux=None, **kwargs):
    """`sliding_window` (in kwargs) needs nothing here: the decoder step's per-layer-type mask carries it.
    Key and value head dims may differ (latent attention)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # a Python int from the weights' shapes, not a traced size
        batch, heads, length, dim = key.shape
        key = key[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)
        value = value[:, :, None].expand(batch, heads, groups, length, value.shape[-1])
        value = value.reshape(batch, heads * groups, length, -1)
    if s_aux is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        out = _attention_with_sinks(query, key, value, attention_mask, scaling, s_aux)
    # clone, not contiguous(): where SDPA's output strides are symbolic (V head dim unlike Q's, sinks),
    # contiguous()'s stride check guards on the query length being 1
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format), None


def _attention_with_sinks(query, key, value, attention_mask, scaling, sinks):
    """Attention sinks (GPT-OSS): one learned logit per head joins every row's softmax and is dropped
    after it. Written as one more key with a zero vector (logit 0) and a zero value, whose additive
    mask entry is the sink: the same softmax, through the same branch-free SDPA (a plain matmul of
    the logits would decompose into shape branches on the query length)."""
    batch, heads, length, _ = query.shape
    key = torch.cat([key, key.new_zeros(batch, heads, 1, key.shape[-1])], dim=2)
    value = torch.cat([value, value.new_zeros(batch, heads, 1, value.shape[-1])], dim=2)
    sink = sinks.to(attention_mask.dtype).reshape(1, heads, 1, 1).expand(batch, heads, length, 1)
    mask = torch.cat([attention_mask.expand(batch, heads, length, -1), sink], dim=-1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)


_register()
