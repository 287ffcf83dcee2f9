"""The float64 reference agrees with transformers' own router and experts (CPU)."""

import pytest
import torch

from moe_compile.plugins.library import Routing, RoutingKind
from moe_compile.plugins.reference import experts_reference, route_reference

transformers = pytest.importorskip("transformers")


def _deepseek_config(**overrides):
    from transformers import DeepseekV3Config

    fields = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                  topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu")
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def test_sigmoid_group_routing_matches_deepseek_v3_router():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(_deepseek_config())
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(std=0.1)
    hidden = torch.randn(50, 64)
    logits, hf_weights, hf_ids = router(hidden)
    routing = Routing(RoutingKind.SIGMOID_GROUP_TOPK, top_k=4, renormalize=True, n_group=4, topk_group=2,
                      routed_scaling_factor=2.5)
    ids, weights = route_reference(logits, routing, router.e_score_correction_bias)
    hf_order = hf_ids.sort(-1)
    order = ids.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(weights.gather(-1, order.indices).float(), hf_weights.gather(-1, hf_order.indices))


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_routing_matches_softmax_then_topk(renormalize):
    torch.manual_seed(1)
    logits = torch.randn(40, 60)
    ids, weights = route_reference(logits, Routing(top_k=4, renormalize=renormalize))
    probs = torch.softmax(logits.double(), -1)
    expected_w, expected_ids = probs.topk(4, -1)
    if renormalize:
        expected_w = expected_w / expected_w.sum(-1, keepdim=True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_w)


def test_experts_match_transformers_eager_experts_layout():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    torch.manual_seed(2)
    config = _deepseek_config()
    config._experts_implementation = "eager"
    experts = DeepseekV3Experts(config).double()
    experts.gate_up_proj.data.normal_(std=0.2)
    experts.down_proj.data.normal_(std=0.2)
    hidden = torch.randn(30, 64, dtype=torch.float64)
    ids = torch.stack([torch.randperm(32)[:4] for _ in range(30)])
    weights = torch.rand(30, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = experts(hidden, ids, weights)
    torch.testing.assert_close(experts_reference(hidden, ids, weights, experts.gate_up_proj.data,
                                                 experts.down_proj.data), expected)
