"""The ONNX Runtime backends' device-resident KV cache: preallocated max-length buffers, swapped
each step, bound by raw pointer through IOBinding. `ort` (CPU provider) and `ort-cuda` share this
code, so the CPU runs prove the binding logic; the CUDA-only tests run where onnxruntime-gpu sees
a device (bench/gpu_e2e.sh), and are skipped here with that reason."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from moe_compile.cli import main
from moe_compile.export.manifest import read_manifest
from moe_compile.runtime.ort_backend import OrtBackend, OrtCudaBackend, ProviderUnavailableError
from moe_compile.verify import verify

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def reference_steps(session, kv_shapes, steps):
    """The same steps through plain `session.run` with numpy KV: present fed back as past."""
    past = [np.zeros(shape, np.float32) for shape in kv_shapes]
    names = [i.name for i in session.get_inputs()]
    results = []
    for ids, mask, positions in steps:
        logits, *past = session.run(None, dict(zip(names, [ids, mask, positions, *past])))
        results.append((logits, past))
    return results


def test_kv_cache_lives_in_two_preallocated_buffers(built):
    out = built("qwen2_moe", "auto")
    backend = OrtBackend(out, read_manifest(out)).activate()
    backend.reset(2)
    pointers = [[b.data_ptr() for b in group] for group in backend.buffers]
    rng = np.random.default_rng(0)
    mask = np.ones((2, 5), np.int64)
    steps = [(rng.integers(0, 500, (2, 5)), mask, np.tile(np.arange(5), (2, 1)))]
    for i in range(3):
        steps.append((rng.integers(0, 500, (2, 1)), np.ones((2, 6 + i), np.int64), np.full((2, 1), 5 + i)))
    expected = reference_steps(backend.session, backend.empty_kv_shapes(2), steps)

    for (ids, mask, positions), (logits, present) in zip(steps, expected):
        before = backend.current
        got = backend.step(ids, mask, positions) if ids.shape[1] > 1 else backend.step_last(ids, mask, positions)
        np.testing.assert_allclose(got, logits if ids.shape[1] > 1 else logits[:, -1], rtol=0, atol=1e-5)
        assert backend.current == 1 - before  # the buffers swapped roles
        for index, tensor in enumerate(present):
            np.testing.assert_allclose(backend.kv_buffer(index), tensor, rtol=0, atol=1e-6)
    # No allocation across steps, nor for a smaller batch later: the same buffers, the same addresses.
    backend.reset(1)
    assert [[b.data_ptr() for b in group] for group in backend.buffers] == pointers


def test_ort_cuda_without_a_cuda_provider_is_a_one_line_error(built, capsys):
    if HAS_CUDA:
        pytest.skip("onnxruntime here has the CUDA provider")
    out = built("qwen2_moe", "auto")
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        OrtCudaBackend(out, read_manifest(out)).activate()
    assert main(["run", str(out), "--backend", "ort-cuda", "--input-ids", "1,2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: backend 'ort-cuda' needs"), err


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (run by bench/gpu_e2e.sh)")
@pytest.mark.parametrize("lowering", ["gather", "dense", "auto"])
def test_ort_cuda_fp32_matches_transformers(built, checkpoint, lowering):
    report = verify(built("qwen2_moe", lowering), model=str(checkpoint("qwen2_moe")), backend="ort-cuda")
    assert report.passed, report.lines()


def test_ort_cuda_picks_flash_decoding_over_xqa_unless_the_user_chose(monkeypatch):
    """onnxruntime 1.31's XQA decode attention measured slower than its flash-decoding path on the H200
    (docs/BENCHMARKS.md): ort-cuda turns it off through ONNX Runtime's own switch, and keeps a user's value."""
    from moe_compile.runtime.ort_backend import XQA_SWITCH

    monkeypatch.delenv(XQA_SWITCH, raising=False)
    OrtCudaBackend.session_options(None, ort.SessionOptions())  # the hook uses no state: no build needed
    assert os.environ[XQA_SWITCH] == "0"
    monkeypatch.setenv(XQA_SWITCH, "1")
    OrtCudaBackend.session_options(None, ort.SessionOptions())
    assert os.environ[XQA_SWITCH] == "1"
