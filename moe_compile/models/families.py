"""The supported families, one entry each. Tiny configs are also the test models (see tests/)."""

from .spec import FamilySpec, Routing, register

_TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # Larger than the 0.02 default so that random-weight logits have clear winners: greedy parity
    # tests then compare real decisions, not float noise between near-tied tokens.
    initializer_range=0.25,
)

QWEN2 = register(
    FamilySpec(
        model_type="qwen2",
        routing=Routing.NONE,
        attention="gqa+qkv_bias",
        tiny_config=dict(_TINY_COMMON, model_type="qwen2"),
    )
)

QWEN2_MOE = register(
    FamilySpec(
        model_type="qwen2_moe",
        routing=Routing.SOFTMAX_TOPK,
        attention="gqa+qkv_bias",
        renormalize_field="norm_topk_prob",
        shared_expert="sigmoid_gated",
        tiny_config=dict(
            _TINY_COMMON,
            model_type="qwen2_moe",
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],  # layer 1 dense: mixes dense and MoE layers
        ),
    )
)

QWEN3_MOE = register(
    QWEN2_MOE.derive(
        model_type="qwen3_moe",
        attention="gqa+qk_norm",
        shared_expert=None,
        tiny_config=dict(
            _TINY_COMMON,
            model_type="qwen3_moe",
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    )
)

MIXTRAL = register(
    FamilySpec(
        model_type="mixtral",
        routing=Routing.SOFTMAX_TOPK,
        attention="gqa",
        renormalize_default=True,  # Mixtral's router always renormalises the top-k
        tiny_config=dict(
            _TINY_COMMON, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2
        ),
    )
)

OLMOE = register(
    QWEN3_MOE.derive(
        model_type="olmoe",
        attention="mha+qk_norm",
        tiny_config=dict(
            _TINY_COMMON,
            model_type="olmoe",
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            pad_token_id=1,
            eos_token_id=2,
        ),
    )
)
