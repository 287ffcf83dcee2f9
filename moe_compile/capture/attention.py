"""The attention function used while capturing, registered in transformers' AttentionInterface.

transformers' own `sdpa` function branches on the query length (a GQA packing path for one
token, an `is_causal` shortcut for several), which under export becomes guards that pin the
sequence length. This one has no shape branches: the additive mask from the decoder step
carries causality, padding and sliding windows, and grouped KV heads are repeated explicitly.
The products are `bmm`s over (batch * heads): `F.scaled_dot_product_attention` and `matmul`
broadcast in C++, whose size-1 checks become `batch != 1` / `length != 1` guards that torch 2.11
cannot leave out (torch 2.13 can, for SDPA only).
"""

from __future__ import annotations

import torch

IMPLEMENTATION = "moe_compile"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, s_aux=None, **kwargs):
    """`sliding_window` (in kwargs) needs nothing here: the decoder step's per-layer-type mask carries it.
    Key and value head dims may differ (latent attention). `s_aux`: GPT-OSS's attention sinks, one
    learned logit per head that joins every row's softmax and is dropped after it."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # a Python int from the weights' shapes, not a traced size
        key = key[:, :, None].expand(batch, key.shape[1], groups, *key.shape[2:]).reshape(batch, heads, -1, dim)
        value = value[:, :, None].expand(batch, value.shape[1], groups, *value.shape[2:])
        value = value.reshape(batch, heads, key.shape[2], -1)
    keys, value_dim = key.shape[2], value.shape[3]
    scale = scaling if scaling is not None else dim**-0.5
    logits = torch.bmm(_flat(query), _flat(key).transpose(1, 2)).view(batch, heads, length, keys) * scale
    logits = logits + attention_mask
    if s_aux is not None:
        sinks = s_aux.to(logits.dtype).reshape(1, heads, 1, 1).expand(batch, heads, length, 1)
        logits = torch.cat([logits, sinks], dim=-1)
    # softmax in fp32, as transformers' eager attention does: 16-bit exp sums lose the small weights
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    if s_aux is not None:
        probs = probs[..., :keys]
    out = torch.bmm(_flat(probs), _flat(value)).view(batch, heads, length, value_dim)
    # clone, not contiguous(): contiguous()'s stride check guards on the query length being 1
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format), None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, d) -> (batch * heads, n, d). A copy then a view: `reshape` of a strided input
    checks in C++ whether a view suffices, which guards on n being 1."""
    batch, heads, n, d = x.shape
    return x.clone(memory_format=torch.contiguous_format).view(batch * heads, n, d)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)


_register()
