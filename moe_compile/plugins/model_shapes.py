"""Expert shapes and routing of the models the fused-MoE kernels are tested and benchmarked on."""

from dataclasses import dataclass

from moe_compile.plugins.library import Routing, RoutingKind


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int


SHAPES = {
    "qwen1.5-moe-a2.7b": MoeShape("qwen1.5-moe-a2.7b", 2048, 1408, 60),
    "mixtral-8x7b": MoeShape("mixtral-8x7b", 4096, 14336, 8),
    "qwen3-30b-a3b": MoeShape("qwen3-30b-a3b", 2048, 768, 128),
}

# Each model's own routing (Qwen1.5-MoE: norm_topk_prob=False; Mixtral and Qwen3: renormalised).
SOFTMAX_ROUTING = {
    "qwen1.5-moe-a2.7b": Routing(RoutingKind.SOFTMAX_TOPK, top_k=4, renormalize=False),
    "mixtral-8x7b": Routing(RoutingKind.SOFTMAX_TOPK, top_k=2, renormalize=True),
    "qwen3-30b-a3b": Routing(RoutingKind.SOFTMAX_TOPK, top_k=8, renormalize=True),
}

# DeepSeek-V3-style routing on the shapes whose expert count splits into groups.
SIGMOID_ROUTING = {
    "qwen1.5-moe-a2.7b": Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=4, renormalize=True, n_group=4,
                                 topk_group=2, routed_scaling_factor=2.5),
    "qwen3-30b-a3b": Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=8, renormalize=True, n_group=8,
                             topk_group=4, routed_scaling_factor=2.5),
}
