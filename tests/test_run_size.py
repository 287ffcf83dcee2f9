"""How many tokens one run may take (passes/run_size.py) and the chunked prefill that keeps every run under
it: at the A2.7B shape, the limits that explain what the H200 showed; on a tiny build, a prefill in
chunks gives the logits and tokens of one whole run."""

from __future__ import annotations

import numpy as np
import pytest

from moe_compile import load
from moe_compile.passes.run_size import MAX_ELEMENTS, elements_per_token, max_run_tokens
from moe_compile.runtime.generate import prefill

A27B = (60, 2 * 1408, 2048, 4)  # experts, gate/up rows, hidden, top-k
PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12], [9, 9, 64, 200, 31]]


def test_limits_at_the_a27b_shape():
    layers = {"layer0": "gather"}
    # gather copies 4 experts' gate/up weights a token: 23M elements, so a 128-token prefill (wrong logits on the
    # H200) is past the limit, a decode step of 8 rows is far inside it
    assert max_run_tokens({"layer0": A27B}, layers, 8, 0) == MAX_ELEMENTS // (4 * 2816 * 2048) == 93
    # dense's [E, 2I, T]: 16,384 tokens (the Split that failed at batch 8 x prompt 2048) is past it, 2048 inside
    assert max_run_tokens({"layer0": A27B}, {"layer0": "dense"}, 8, 0) == MAX_ELEMENTS // (60 * 2816) == 12710
    # auto runs gather only up to its threshold: its limit is dense's
    assert elements_per_token("auto", A27B, 8) == elements_per_token("dense", A27B, 8)
    assert max_run_tokens({"layer0": A27B}, {"layer0": "fused"}, 8, 0) is None
    # the portable form's attention scores [B, heads, S, past + S] count too
    assert max_run_tokens({"layer0": A27B}, {"layer0": "fused"}, 8, 16 * 2**20) == MAX_ELEMENTS // (16 * 2**20)


@pytest.mark.parametrize("lowering", ["auto", "gather"])
def test_prefill_in_chunks_matches_one_run(built, reference_tokens, monkeypatch, lowering):
    model = load(built("qwen2_moe", lowering))
    manifest, pad = model.backend.manifest, model.backend.manifest.pad_token_id
    whole, _ = prefill(model.backend, PROMPTS, pad)
    assert manifest.max_run_tokens > 3 * 9  # a tiny build runs these prompts whole
    widths, step_last = [], model.backend.step_last
    monkeypatch.setattr(model.backend, "step_last", lambda ids, *rest: widths.append(ids.shape[1]) or step_last(ids, *rest))
    for limit in (3, 4, 7):  # chunks of 1, 1 and 2 columns; rows all padding in the first chunks
        manifest.max_run_tokens = limit
        widths.clear()
        chunked, _ = prefill(model.backend, PROMPTS, pad)
        assert sum(widths) == 9 and max(widths) == max(1, limit // 3)  # every run under the limit
        assert np.abs(chunked - whole).max() <= 1e-4 * np.abs(whole).max()
        assert [g.token_ids for g in model.generate(PROMPTS, max_new_tokens=32)] == reference_tokens("qwen2_moe", PROMPTS, 32)
