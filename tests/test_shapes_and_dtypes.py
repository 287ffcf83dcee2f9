"""Sizes the graph was not traced with, the build's bounds, and fp16/bf16 builds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from moe_compile import load
from moe_compile.errors import RequestError
from moe_compile.runtime.ort_backend import MissingKernelError
import torch

from moe_compile.models.loading import load_model
from moe_compile.verify import default_prompt, verify


# The shared build (max_batch 4, max_seq 128) and its bounds; a build of its own for these bounds would cost a minute.
def test_serves_untraced_batch_and_lengths_up_to_bounds(built):
    model = load(built("qwen2_moe", "auto"))
    seq = model.manifest.max_seq
    assert (model.manifest.max_batch, seq) == (4, 128)
    prompts = [[7] * n for n in (1, 65, 5, seq - 4)]  # batch 4 (traced with 2), lengths 1..124
    results = model.generate(prompts, max_new_tokens=4)
    assert all(1 <= len(r.token_ids) <= 4 for r in results)
    model.backend.reset(1)
    ids = np.ones((1, seq), dtype=np.int64)
    assert model.backend.step(ids, ids, np.arange(seq)[None]).shape == (1, seq, 512)  # exactly max_seq


def test_past_the_bounds_is_a_clear_error(built):
    model = load(built("qwen2_moe", "auto"))
    with pytest.raises(RequestError, match="max_seq"):
        model.generate([[7] * (model.manifest.max_seq - 4)], max_new_tokens=5)
    with pytest.raises(RequestError, match="max-batch"):
        model.backend.reset(5)


def test_fp16_on_ort_cpu_agrees_with_fp32(built, checkpoint):
    out = built("qwen2_moe", "auto", dtype="fp16")
    report = verify(out, model=str(checkpoint("qwen2_moe")), new_tokens=64)
    assert report.top1_agreement >= 0.95, report.lines()


def test_bf16_builds_runs_on_torch_and_ort_cpu_refuses_clearly(built, checkpoint):
    out = built("qwen2_moe", "auto", dtype="bf16")
    onnx.checker.check_model(str(out / "model.onnx"))
    report = verify(out, model=str(checkpoint("qwen2_moe")), new_tokens=64, backend="torch")
    # bf16 keeps 8 mantissa bits: hold it to transformers' own bf16 agreement on the same positions.
    sequence = torch.tensor([default_prompt(512) + report.reference_tokens])
    with torch.no_grad():
        fp32 = load_model(checkpoint("qwen2_moe"))(sequence).logits[0].argmax(-1)
        bf16 = load_model(checkpoint("qwen2_moe"), "bf16")(sequence).logits[0].argmax(-1)
    start = len(default_prompt(512)) - 1
    transformers_agreement = (fp32 == bf16)[start:].float().mean().item()
    assert report.top1_agreement >= transformers_agreement - 0.05, (report.lines(), transformers_agreement)
    with pytest.raises(MissingKernelError, match="bf16.*--backend torch"):
        load(out, "ort")
