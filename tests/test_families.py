"""Family-specific refusals: a checkpoint whose code cannot be captured statically gets one line
naming the family and the source line, not a torch.export trace."""

from __future__ import annotations

import pytest
import torch

from moe_compile.capture import capture
from moe_compile.errors import UnsupportedModelError
from moe_compile.models import FAMILIES


def test_phimoe_longrope_is_refused_naming_the_branch():
    from transformers import AutoConfig, AutoModelForCausalLM

    # Phi-3.5-MoE's real rope: long or short factors picked from the largest position id at run time.
    rope = dict(rope_type="longrope", rope_theta=10000.0, long_factor=[1.5] * 8, short_factor=[1.0] * 8,
                long_mscale=1.2, short_mscale=1.1, original_max_position_embeddings=256)
    config = AutoConfig.for_model(**dict(FAMILIES["phimoe"].tiny_config, num_hidden_layers=1, rope_parameters=rope))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"^phimoe: unsupported because .*modeling_phimoe\.py:\d+"):
        capture(model, max_batch=2, max_seq=32)
