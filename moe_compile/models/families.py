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
        examples=("Qwen/Qwen2.5-0.5B",),
        routing=Routing.NONE,
        attention="gqa+qkv_bias",
        tiny_config=dict(_TINY_COMMON, model_type="qwen2"),
    )
)

QWEN2_MOE = register(
    FamilySpec(
        model_type="qwen2_moe",
        examples=("Qwen/Qwen1.5-MoE-A2.7B",),
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
        examples=("Qwen/Qwen3-30B-A3B",),
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
        examples=("mistralai/Mixtral-8x7B-v0.1",),
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
        examples=("allenai/OLMoE-1B-7B-0924",),
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

# Latent attention of the DeepSeek families, with every width distinct so that no two can be mixed up.
_MLA = dict(
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,  # K and V head dims differ (24 vs 12): the cache must allow it
    num_key_value_heads=4,
)

DEEPSEEK_V2 = register(
    FamilySpec(
        model_type="deepseek_v2",
        examples=("deepseek-ai/DeepSeek-V2-Lite",),
        routing=Routing.SOFTMAX_GROUP_TOPK,
        attention="mla",
        ort_form_blocker="latent attention (MLA) caches a compressed KV that GroupQueryAttention cannot read",
        complex_rope=True,
        shared_expert="ungated",
        routing_fields=("topk_method", "n_group", "topk_group", "routed_scaling_factor"),
        tiny_config=dict(
            _TINY_COMMON | _MLA,
            model_type="deepseek_v2",
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",  # V2-Lite uses "greedy"; this covers the grouped path too
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
    )
)

DEEPSEEK_V3 = register(
    DEEPSEEK_V2.derive(
        model_type="deepseek_v3",
        examples=("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1"),
        routing=Routing.SIGMOID_GROUP_TOPK,
        complex_rope=False,
        renormalize_field="norm_topk_prob",
        routing_fields=("n_group", "topk_group", "routed_scaling_factor"),
        tiny_config=dict(
            _TINY_COMMON | _MLA,
            model_type="deepseek_v3",
            q_lora_rank=32,  # V3 compresses queries too
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    )
)

GLM4_MOE = register(
    DEEPSEEK_V3.derive(
        model_type="glm4_moe",
        examples=("zai-org/GLM-4.5-Air",),
        attention="gqa+partial_rope+qk_norm",
        ort_form_blocker=None,  # not MLA: the ort form serves it (routing computed in the graph)
        tiny_config=dict(
            _TINY_COMMON,
            model_type="glm4_moe",
            head_dim=32,  # wider than hidden / heads, as GLM-4.5's: a rotary half of 8, what GroupQueryAttention takes
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            attention_bias=True,
            partial_rotary_factor=0.5,
        ),
    )
)

GPT_OSS = register(
    FamilySpec(
        model_type="gpt_oss",
        examples=("openai/gpt-oss-20b",),
        routing=Routing.TOPK_SOFTMAX,
        renormalize_default=True,  # a softmax over the k: the weights sum to 1
        attention="gqa+sinks+sliding_window",
        ort_form_blocker="attention sinks and per-layer sliding windows are not in the ort form yet",
        experts_gate="swiglu_oai",
        tiny_config=dict(
            _TINY_COMMON,
            model_type="gpt_oss",
            num_hidden_layers=2,  # one sliding, one full layer
            head_dim=16,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,  # shorter than the test prompts and generations: the window matters
            swiglu_limit=1.0,  # low enough that the clamp bites at these weight scales
        ),
    )
)

GRANITEMOE = register(
    FamilySpec(
        model_type="granitemoe",
        examples=("ibm-granite/granite-3.1-3b-a800m-instruct",),
        routing=Routing.TOPK_SOFTMAX,
        renormalize_default=True,  # a softmax over the k: the weights sum to 1
        attention="gqa+multipliers",
        tiny_config=dict(
            _TINY_COMMON,
            model_type="granitemoe",
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
    )
)

GRANITEMOESHARED = register(
    GRANITEMOE.derive(
        model_type="granitemoeshared",
        shared_expert="ungated",
        examples=(),
        tiny_config=dict(GRANITEMOE.tiny_config, model_type="granitemoeshared", shared_intermediate_size=64),
    )
)

PHIMOE = register(
    FamilySpec(
        model_type="phimoe",
        # Phi-3.5-MoE itself is refused: its longrope rotary branches on the largest position id.
        routing=Routing.SPARSEMIXER,
        attention="gqa+layernorm",
        routing_fields=("router_jitter_noise",),
        tiny_config=dict(
            _TINY_COMMON,
            model_type="phimoe",
            num_local_experts=8,
            num_experts_per_tok=2,
            router_jitter_noise=0.2,  # in eval, the margin that decides which experts share the softmax
            attention_bias=True,
            lm_head_bias=True,
        ),
    )
)
