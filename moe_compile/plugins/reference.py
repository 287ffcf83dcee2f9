"""Float64 reference of the fused MoE op, written for clarity (an expert loop), not speed.

Routing selects exactly as the kernels do: stable descending order, so equal values go to the
lower expert index; softmax mode ranks the logits themselves (same order as the probabilities).
"""

import torch

from moe_compile.plugins.library import Routing, RoutingKind


def _topk_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route_reference(logits: torch.Tensor, routing: Routing,
                    expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [T,K] int64, weights [T,K] float64)."""
    logits = logits.double()
    if routing.kind == RoutingKind.SOFTMAX_TOPK:
        ids = _topk_stable(logits, routing.top_k)
        weights = torch.softmax(logits, dim=-1).gather(-1, ids)
        if routing.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        scores = torch.sigmoid(logits)
        choice = scores + (0 if expert_bias is None else expert_bias.double())
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, routing.n_group, num_experts // routing.n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool)
        kept.scatter_(1, _topk_stable(group_score, routing.topk_group), True)
        masked = choice.masked_fill(~kept.repeat_interleave(num_experts // routing.n_group, dim=1), float("-inf"))
        ids = _topk_stable(masked, routing.top_k)
        weights = scores.gather(-1, ids)
        if routing.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * routing.routed_scaling_factor


def experts_reference(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t,k] * down_e(silu(gate_e x) * up_e x), in float64."""
    x = hidden.double()
    out = torch.zeros_like(x)
    intermediate = down_proj.shape[-1]
    for e in torch.unique(ids).tolist():
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        gate_up = x[token] @ gate_up_proj[e].double().T
        act = torch.nn.functional.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = act @ down_proj[e].double().T
        out.index_add_(0, token, y * weights[token, slot].double().unsqueeze(-1))
    return out


def fused_moe_reference(hidden: torch.Tensor, logits: torch.Tensor, gate_up_proj: torch.Tensor,
                        down_proj: torch.Tensor, routing: Routing,
                        expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    ids, weights = route_reference(logits, routing, expert_bias)
    return experts_reference(hidden, ids, weights, gate_up_proj, down_proj)


def shared_expert_reference(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                            gate_logits: torch.Tensor | None = None) -> torch.Tensor:
    """g_t * down(silu(gate x_t) * up x_t) in float64; gate_up [2I_s, H] (gate rows, then up rows),
    down [H, I_s]; g_t = sigmoid(gate_logits[t]), or 1."""
    gu = hidden.double() @ gate_up.double().T
    intermediate = down.shape[-1]
    y = (torch.nn.functional.silu(gu[:, :intermediate]) * gu[:, intermediate:]) @ down.double().T
    return y if gate_logits is None else torch.sigmoid(gate_logits.double()).unsqueeze(-1) * y


def decode_attention_reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
                               cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int,
                               scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """com.microsoft:GroupQueryAttention's decode step as moe_compile_decode_attention computes it, in float64:
    qkv [B, (N + 2 KV) D] (one new token a row), caches [B, KV, max_seq, D], the token at seqlens_k[b], half-split
    rotary by cos/sin [positions, R/2] (None: none); q and the new k rounded to the cache's dtype after rotation.
    Returns (output [B, N D], k_cache, v_cache with the token written), in the caches' dtype."""
    B, kv_heads, _, D = k_cache.shape
    q, k, v = qkv.view(B, -1, D).split([num_heads, kv_heads, kv_heads], dim=1)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = torch.empty(B, num_heads, D, dtype=k_cache.dtype)
    scale = scale or D ** -0.5
    group = num_heads // kv_heads

    def rotate(x: torch.Tensor, position: int) -> torch.Tensor:
        if cos is None:
            return x
        half = cos.shape[1]
        c, s = cos[position].double(), sin[position].double()
        x = x.double()
        first, second = x[..., :half], x[..., half:2 * half]
        rotated = torch.cat([first * c - second * s, second * c + first * s, x[..., 2 * half:]], dim=-1)
        return rotated.to(k_cache.dtype)

    for b in range(B):
        position = int(seqlens_k[b])
        k_cache[b, :, position] = rotate(k[b], position)
        v_cache[b, :, position] = v[b]
        keys, values = k_cache[b, :, :position + 1].double(), v_cache[b, :, :position + 1].double()
        queries = rotate(q[b], position).double() * scale
        scores = torch.einsum("nd,nsd->ns", queries, keys.repeat_interleave(group, dim=0))
        out[b] = torch.einsum("ns,nsd->nd", scores.softmax(-1), values.repeat_interleave(group, dim=0)).to(out.dtype)
    return out.reshape(B, num_heads * D), k_cache, v_cache
