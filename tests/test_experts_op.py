"""The experts op's lowerings against transformers' own experts forward (`batched_mm`), on each
registered family's experts layout: biases, interleaved/transposed weights, custom gated units."""

from __future__ import annotations

import pytest
import torch

from moe_compile.capture.experts_op import activation_of, canonical_weights, experts_modules
from moe_compile.models import FAMILIES
from moe_compile.passes import LOWERINGS, PASSES
from moe_compile.passes.lowering import LoweringPass

MOE_FAMILIES = sorted(name for name, spec in FAMILIES.items() if spec.routing.value != "none")
# The lowerings that replace the experts op alone (a fused lowering takes the router too).
EXPERTS_LOWERINGS = [name for name in LOWERINGS if issubclass(PASSES[name], LoweringPass)]


def tiny_experts(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**FAMILIES[family].tiny_config)
    module = next(iter(experts_modules(AutoModelForCausalLM.from_config(config)).values()))
    with torch.no_grad():  # transformers initialises expert biases to zero: make them count
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.25)
    return module


@pytest.mark.parametrize("lowering", EXPERTS_LOWERINGS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lowering_matches_transformers_experts(family, lowering):
    module = tiny_experts(family)
    experts, hidden = module.gate_up_proj.shape[0], module.config.hidden_size
    lowered = PASSES[lowering](auto_threshold=4).lowering()
    gate_up, down, gate_up_bias, down_bias = canonical_weights(module)
    activation, params = activation_of(module)
    for tokens in (1, 12):  # both sides of auto's threshold
        x = torch.randn(tokens, hidden)
        ids = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2)
        module.config._experts_implementation = "batched_mm"
        with torch.no_grad():
            expected = module(x, ids, weights)
            got = lowered(x, ids, weights, gate_up, down, activation, gate_up_bias, down_bias, **params)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_gpt_oss_gate_is_clamped_swiglu_with_biases():
    module = tiny_experts("gpt_oss")
    activation, params = activation_of(module)
    assert activation == "swiglu_oai" and params == {"alpha": module.alpha, "limit": module.limit}
    assert all(b is not None for b in canonical_weights(module)[2:])
