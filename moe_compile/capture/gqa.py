"""The ort form's attention: one `moe_compile::gqa` op per layer over an in-place KV cache, exported as
ONNX Runtime's `com.microsoft:GroupQueryAttention` (export/ort_ops.py).

    hidden ─q/k/v_proj (HF's own code, norms included)─▶ q [B,N,S,D], k/v [B,KV,S,D] (not rotated)
        ─▶ gqa(q, k, v, past_k, past_v, seqlens_k, total, cos, sin) ─▶ out [B,S,N·D], present_k, present_v

GroupQueryAttention's contract (checked on onnxruntime 1.32's CPU kernel against this file's eager
kernel): the cache is [B, KV, max_seq, D] and `present` is the same buffer as `past` at run time;
`seqlens_k[b]` is row b's last valid slot after this step. A prefill from an empty cache has
`total == S` (prompts right-padded); a decode step has S = 1 and writes row b's new K/V at slot
`seqlens_k[b]`. Rotary is applied inside the op (do_rotary, rotate-half layout) at positions
`past_b + i`, from cos/sin tables of [max_seq, rotary_dim / 2].

Rotary moves into the op, so while capturing, the family's `apply_rotary_pos_emb` is the identity
(`deferred_rotary`, a scoped patch that restores it); the attention function, registered in
transformers' AttentionInterface, reads the step's KV context from its kwargs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

IMPLEMENTATION = "moe_compile_gqa"


@torch.library.custom_op("moe_compile::gqa", mutates_args=())
def gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
        seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
        kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of GroupQueryAttention's share-buffer semantics (see the module docstring)."""
    batch, new, _ = query.shape
    dim = past_key.shape[-1]
    first_prompt = int(total_length) == new
    q = query.view(batch, new, num_heads, dim).float()
    k = key.view(batch, new, kv_heads, dim).float()
    v = value.view(batch, new, kv_heads, dim)
    present_key, present_value = past_key.clone(), past_value.clone()
    out = torch.zeros(batch, new, num_heads, dim, dtype=torch.float32)
    for b in range(batch):
        valid = int(seqlens_k[b]) + 1  # slots 0..valid-1 hold row b's tokens after this step
        past = 0 if first_prompt else valid - new
        positions = torch.arange(past, past + new)
        present_key[b, :, past:past + new] = _rotate(k[b], positions, cos, sin).transpose(0, 1).to(past_key.dtype)
        present_value[b, :, past:past + new] = v[b].transpose(0, 1)
        keys = present_key[b, :, :valid].float().repeat_interleave(num_heads // kv_heads, 0)  # [N, valid, D]
        values = present_value[b, :, :valid].float().repeat_interleave(num_heads // kv_heads, 0)
        scores = torch.einsum("snd,nkd->nsk", _rotate(q[b], positions, cos, sin), keys) * scale
        causal = torch.arange(valid)[None, :] <= positions[:, None]  # [S, valid]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).nan_to_num()  # padded rows: all masked
        out[b] = torch.einsum("nsk,nkd->snd", probs, values)
    return out.reshape(batch, new, num_heads * dim).to(query.dtype), present_key, present_value


@gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads, kv_heads, scale):
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first 2·cos.shape[1] dims of x [S, heads, D] at `positions`."""
    half = cos.shape[1]
    c, s = cos[positions].float()[:, None], sin[positions].float()[:, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


@dataclasses.dataclass
class InPlaceKV:
    """What every layer's attention reads during one captured step, and where it leaves its present."""

    past: list[tuple[torch.Tensor, torch.Tensor]]
    seqlens_k: torch.Tensor  # int32 [B]
    total_length: torch.Tensor  # int32 scalar
    cos: torch.Tensor  # [max_seq, rotary_dim / 2]
    sin: torch.Tensor
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, inplace_kv=None, **kwargs):
    """query [B,N,S,D], key/value [B,KV,S,D]: this step's tokens, not rotated, no cache concatenated."""
    if inplace_kv is None:
        raise RuntimeError(f"{IMPLEMENTATION} attention runs only inside the ort form's decoder step")
    batch, heads, new, dim = query.shape
    kv_heads = key.shape[1]
    past_key, past_value = inplace_kv.past[module.layer_idx]

    def flat(x):  # [B, H, S, D] -> [B, S, H·D]
        return x.transpose(1, 2).reshape(batch, new, x.shape[1] * dim)

    out, present_key, present_value = torch.ops.moe_compile.gqa(
        flat(query), flat(key), flat(value), past_key, past_value, inplace_kv.seqlens_k, inplace_kv.total_length,
        inplace_kv.cos, inplace_kv.sin, heads, kv_heads, float(scaling if scaling is not None else dim**-0.5),
    )
    inplace_kv.present[module.layer_idx] = (present_key, present_value)
    return out.view(batch, new, heads, dim), None


def _identity_rotary(q, k, *args, **kwargs):
    return q, k


@contextlib.contextmanager
def deferred_rotary(model: torch.nn.Module):
    """Make the family's `apply_rotary_pos_emb` the identity while capturing: GroupQueryAttention rotates."""
    modules = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")}
    patched = [m for m in modules if hasattr(m, "apply_rotary_pos_emb")]
    saved = [m.apply_rotary_pos_emb for m in patched]
    try:
        for m in patched:
            m.apply_rotary_pos_emb = _identity_rotary
        yield
    finally:
        for m, original in zip(patched, saved):
            m.apply_rotary_pos_emb = original


def rotary_tables(model: torch.nn.Module, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq, rotary_dim / 2] from the model's own rotary embedding (scaling included), in
    the model's dtype. GroupQueryAttention's rotate-half layout repeats the half: checked here."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_seq)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].float(), sin[0].float()
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise ValueError("the rotary embedding is not in the rotate-half layout GroupQueryAttention applies")
    return cos[:, :half].to(model.dtype).contiguous(), sin[:, :half].to(model.dtype).contiguous()


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)


_register()
