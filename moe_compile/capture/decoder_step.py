"""The decoder step with explicit KV tensors: what `torch.export` captures.

    input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
    past_key_values.{i}.key/value [B, kv_heads, P, head_dim]
        -> logits [B, S, V] (fp32), present.{i}.key/value [B, kv_heads, P+S, head_dim]

`present = concat(past, new)`: the portable KV form every runtime reads. A sliding-window layer's
cache grows like the others and its mask hides what lies outside the window (exact; see
docs/FAMILIES.md for why the cache is not trimmed). The additive attention
mask is built here from the 2D padding mask rather than by transformers' mask helpers, whose
fast paths branch on data; a padded query row may attend to itself so that no row is fully
masked (a fully masked row gives NaN in fp16, and NaN in a padded slot of the cache would leak
into later steps through 0 * NaN).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import UnsupportedModelError


class _ConcatLayer(DynamicLayer):
    """A DynamicLayer whose length is read from the shape alone: `numel() == 0` would be a
    data-dependent branch under export."""

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """optimum's KV naming: `past_key_values.{i}.key/value` in, `present.{i}.key/value` out."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


def kv_shapes(model: torch.nn.Module) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer ((kv_heads, key_dim), (kv_heads, value_dim)), read off one eager step: no config
    field guessing, and families whose K and V differ (latent attention) need nothing special. The step
    runs our experts op: transformers' own experts implementations refuse some shapes (grouped_mm on the
    CPU: expert rows that are not a multiple of 16 bytes)."""
    from .experts_op import traceable

    with traceable(model, model.config._attn_implementation), torch.no_grad():  # attention as it is
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    shapes = []
    for layer in out.past_key_values.layers:
        k, v = layer.keys, layer.values
        shapes.append(((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])))
    return shapes


LAYER_TYPES = ("full_attention", "sliding_attention")


def check_attention(config, max_seq: int) -> None:
    """Per-layer attention types (`config.layer_types`) get their own mask, which makes sliding-window
    layers exact at any length; a model-wide window without layer types is exact only within it."""
    types = set(getattr(config, "layer_types", None) or ())
    unknown = sorted(types - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"{config.model_type}: attention layer types {unknown} are not supported")
    if types:
        return
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and max_seq > window:
        raise UnsupportedModelError(
            f"{config.model_type}: sliding-window attention (window {window}) is not supported yet beyond "
            f"the window; build with --max-seq {window} or less"
        )


class DecoderStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, max_seq: int):
        super().__init__()
        check_attention(model.config, max_seq)
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = Cache(layers=[_ConcatLayer() for _ in range(self.num_layers)])
        for i, layer in enumerate(cache.layers):
            layer.update(past[2 * i], past[2 * i + 1])
        past_length, new = past[0].shape[-2], input_ids.shape[1]
        mask = additive_mask(attention_mask, past_length, new, self.model.dtype)
        if "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ()):
            # transformers' models take a mask per layer type, as `generate` prepares them
            window = self.model.config.sliding_window
            sliding = additive_mask(attention_mask, past_length, new, self.model.dtype, window)
            mask = {"full_attention": mask, "sliding_attention": sliding}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,  # 4D masks pass through transformers' mask helpers unchanged
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        # Logits leave in fp32 whatever the model dtype: the host samples from them (numpy has no bf16).
        return (out.logits.float(), *present)


def additive_mask(attention_mask: torch.Tensor, past: int, new: int, dtype: torch.dtype,
                  window: int | None = None) -> torch.Tensor:
    """[B, 1, S, P+S]: 0 where query i may attend key j (causal, within `window` of it if given, not
    padding, or itself), else min. Positions are cache slots, as in transformers' sliding mask."""
    query = torch.arange(new, device=attention_mask.device) + past
    key = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = key[None, :] <= query[:, None]
    if window is not None:
        causal = causal & (key[None, :] > query[:, None] - window)
    visible = attention_mask[:, None, None, :].bool() | (key[None, :] == query[:, None])
    allowed = causal[None, None] & visible
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class InPlaceDecoderStep(torch.nn.Module):
    """The ort form's decoder step (capture/gqa.py says what the attention does):

        input_ids [B, S], attention_mask [B, T], past_key_values.{i}.key/value [B, kv_heads, max_seq, head_dim]
            -> logits [B, V] (fp32, each row's last real position), next_token [B] (argmax),
               top_logits, top_ids [B, C] (top-k, for sampling on the host), present.{i}.key/value (= past's buffers)

    A prefill has right-padded rows and T = S; a decode step has S = 1 and T = max_seq, with ones on the
    slots each row fills after it. `seqlens_k` (each row's last slot) and `total_sequence_length` (T) come
    from the mask in the graph, so decode shapes never change. Only the last real position reaches the
    LM head: index `min(seqlens_k, S - 1)` (the last prompt token in a prefill, 0 in a decode step).
    Every input of a device op is computed on the device (no shape-derived scalars): CUDA graphs refuse
    the host-to-device copies ONNX Runtime would insert.
    """

    def __init__(self, model: torch.nn.Module, max_seq: int, candidates: int):
        from .gqa import rotary_tables

        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.candidates = min(candidates, model.config.vocab_size)
        cos, sin = rotary_tables(model, max_seq)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask, *past):
        from .gqa import InPlaceKV

        batch, new = input_ids.shape
        seqlens = attention_mask.sum(-1) - 1
        total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
        kv = InPlaceKV([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], seqlens.to(torch.int32),
                       total, self.rotary_cos, self.rotary_sin)
        # S - 1 from the data, not the shape: a shape-derived scalar lives on the host, and ONNX Runtime
        # would copy it to the device every step (a Memcpy node, which CUDA graphs refuse).
        last = torch.minimum(seqlens, torch.ones_like(input_ids).sum(-1) - 1)
        head = self.model.lm_head
        try:
            self.model.lm_head = _LastPositionHead(head, last)
            # The 4D mask is never read (GroupQueryAttention masks by seqlens_k); passing one keeps
            # transformers' mask builders out of the graph.
            out = self.model(input_ids=input_ids, attention_mask=torch.zeros(batch, 1, new, 1, dtype=self.model.dtype),
                             use_cache=False, inplace_kv=kv)
        finally:
            self.model.lm_head = head
        logits = out.logits[:, 0].float()
        top = logits.topk(self.candidates, dim=-1)
        present = [t for i in range(self.num_layers) for t in kv.present[i]]
        return (logits, logits.argmax(-1), top.values, top.indices, *present)


class _LastPositionHead(torch.nn.Module):
    """The LM head on one position per row: hidden [B, S, H] -> head(hidden[b, index[b]]) [B, 1, V]."""

    def __init__(self, head: torch.nn.Module, index: torch.Tensor):
        super().__init__()
        self.head, self.index = head, index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        index = self.index[:, None, None].expand(hidden.shape[0], 1, hidden.shape[2])
        return self.head(hidden.gather(1, index))
