"""Sizes the graph was not traced with, the build's bounds, and fp16/bf16 builds."""

from __future__ import annotations

import numpy as np
import pytest

from moe_compile import load
from moe_compile.errors import RequestError
from moe_compile.verify import verify


def test_serves_untraced_batch_and_lengths_up_to_bounds(built):
    model = load(built("qwen2_moe", "auto", max_batch=4, max_seq=64))
    prompts = [[7] * n for n in (1, 33, 5, 60)]  # batch 4 (traced with 2), lengths 1..60
    results = model.generate(prompts, max_new_tokens=4)
    assert [len(r.token_ids) for r in results] <= [4] * 4
    model.backend.reset(1)
    ids = np.ones((1, 64), dtype=np.int64)
    assert model.backend.step(ids, ids, np.arange(64)[None]).shape == (1, 64, 512)  # exactly max_seq


def test_past_the_bounds_is_a_clear_error(built):
    model = load(built("qwen2_moe", "auto", max_batch=4, max_seq=64))
    with pytest.raises(RequestError, match="max_seq"):
        model.generate([[7] * 60], max_new_tokens=5)
    with pytest.raises(RequestError, match="max-batch"):
        model.backend.reset(5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_agrees_with_fp32(built, checkpoint, dtype):
    out = built("qwen2_moe", "auto", dtype=dtype)
    report = verify(out, model=str(checkpoint("qwen2_moe")), new_tokens=64)
    assert report.top1_agreement >= 0.95, report.lines()
