"""Weight-only quantization (build --quantize, moe_compile/quantize/).

What the tiny random-weight models can show, and what they cannot: their logits are chaotic under any
weight perturbation (initializer_range 0.25, routers that flip on small changes), so quantizing them in
torch itself, the same RTN, agrees with fp32 transformers on only ~81% (int8) and ~23% (int4) of greedy
positions (tiny Qwen2-MoE, 2026-12-01). The issue's 98%/85% against fp32 are a property of the model, not
of our graphs; here they are asserted against the dequantized reference (the same weights dequantized and
run in transformers), and the agreement with fp32 and the mean KL are reported and must be no worse than
the dequantized reference's own. The exactness check (logits against the dequantized reference, 1e-3
relative) is what proves the packing: a wrong layout, axis, nibble order or scale moves logits by O(1).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from moe_compile import load
from moe_compile.errors import RequestError
from moe_compile.models.loading import load_model
from moe_compile.quantize import AGREEMENT, Quantization, weight_class
from moe_compile.quantize.packing import quantize_rows
from moe_compile.quantize.torch_weights import fake_quantize
from moe_compile.verify import teacher_forced_logits

from conftest import ort_form_variants

ORT_VARIANTS = [v for v in ort_form_variants() if "-" not in v]  # one build per family (CI time)
PROMPTS = [np.random.default_rng(seed).integers(3, 500, 8).tolist() for seed in range(4)]
NEW_TOKENS = 64  # 4 prompts x 64 teacher-forced positions = 256
# int8 on the CPU provider's QMoE: activations quantized to int8 inside the op (no fp32 kernel for block-wise
# 8-bit experts, onnxruntime 1.32): ~1% of one layer's output (QMOE_INT8), which the chaotic tiny models amplify
# to 0.04 (Qwen2-MoE) and 0.36 (Qwen3-MoE) relative on the logits, 98% and 94% top-1 agreement with the
# dequantized reference (measured 2026-12-01). Everything else is exact to float rounding (EXACT).
EXACT, QMOE_INT8, QMOE_INT8_AGREEMENT = 1e-3, 5e-2, 0.90


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = torch.log_softmax(torch.from_numpy(p_logits), -1), torch.log_softmax(torch.from_numpy(q_logits), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def measure(out, checkpoint: str, scheme: str) -> dict:
    """Teacher-forced over fp32 transformers' greedy continuations: the build's logits against fp32 and
    against the dequantized reference, and the reference's own agreement with fp32."""
    reference = load_model(Path(checkpoint))
    dequantized = load_model(Path(checkpoint))
    fake_quantize(dequantized, Quantization(scheme))
    compiled = load(out)
    ours, fp32, deq = [], [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None)[0]
            cont = ids[len(prompt):].tolist()
            fp32.append(reference(ids[None]).logits[0, len(prompt) - 1:-1].numpy())
            deq.append(dequantized(ids[None]).logits[0, len(prompt) - 1:-1].numpy())
            ours.append(teacher_forced_logits(compiled.backend, prompt, cont[:-1], compiled.manifest.pad_token_id))
    ours, fp32, deq = map(np.concatenate, (ours, fp32, deq))
    return {"positions": len(ours), "agreement_fp32": _agreement(ours, fp32), "kl_fp32": _kl(fp32, ours),
            "agreement_dequantized": _agreement(ours, deq),
            "relative_dequantized": float(np.abs(ours - deq).max() / np.abs(deq).max()),
            "reference_agreement_fp32": _agreement(deq, fp32), "reference_kl_fp32": _kl(fp32, deq)}


def check(report: dict, scheme: str, tolerance: float | None) -> None:
    """`tolerance` None: the CPU's int8 QMoE, whose activation rounding the logits cannot be held to."""
    print(report)  # the figures: agreement and mean KL against fp32 transformers (pytest -s shows them)
    assert report["positions"] == len(PROMPTS) * NEW_TOKENS
    if tolerance is None:
        assert report["agreement_dequantized"] >= QMOE_INT8_AGREEMENT, report
    else:
        assert report["relative_dequantized"] <= tolerance, report
        assert report["agreement_dequantized"] >= AGREEMENT[scheme], report
    assert report["agreement_fp32"] >= report["reference_agreement_fp32"] - 0.03, report
    assert report["kl_fp32"] > 0, report  # the weights did change


def _ops(out) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)


# --- the quantizer and its packing -------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_codes_scales_and_reference_dequantizer(bits):
    w = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    q = quantize_rows(w, bits, 32, np.float32)
    assert q.codes.shape == (3, 5, 2, 32 * bits // 8) and q.scales.shape == (3, 5, 2)
    assert (q.scales > 0).all()  # TensorRT refuses negative DequantizeLinear scales
    qmax = (1 << (bits - 1)) - 1
    codes = q.unpacked().astype(np.int32)
    assert codes.min() >= -qmax and codes.max() <= qmax and np.abs(codes).max() == qmax
    if bits == 4:  # MatMulNBits' layout: two codes a byte, the lower nibble first, stored as code + 8
        assert q.codes[0, 0, 0, 0] == (codes[0, 0, 0] + 8) | ((codes[0, 0, 1] + 8) << 4)
    step = np.repeat(q.scales, 32, axis=-1)
    assert np.abs(q.dequantize() - w).max() <= (step / 2 + 1e-6).max()
    again = quantize_rows(q.dequantize(), bits, 32, np.float32)  # what the build relies on: idempotent
    assert (again.codes == q.codes).all() and (again.scales == q.scales).all()


def test_weight_classes():
    assert weight_class("model.layers.0.mlp.experts") == "experts"
    assert weight_class("model.layers.0.mlp.gate") == "router"
    assert weight_class("model.layers.0.block_sparse_moe.router.layer") == "router"
    assert weight_class("model.layers.0.mlp.shared_expert_gate") == "gate"
    assert weight_class("model.layers.0.mlp.shared_expert.gate_proj") == "mlp"
    assert weight_class("model.model.layers.3.self_attn.q_proj") == "attention"
    assert weight_class("model.embed_tokens") == "embedding"
    assert weight_class("lm_head") == "lm_head"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("renormalize", [0, 1])
def test_qmoe_runs_the_packed_experts(bits, renormalize):
    """One QMoE node against numpy on the dequantized weights (what the ort-form rewrite emits, routing
    weights as the MoE node's contract)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from moe_compile.quantize.onnx_rewrite import _quantize_ort

    rng = np.random.default_rng(bits + renormalize)
    e, h, i, t, k = 4, 64, 32, 5, 2
    fc1, fc2 = rng.standard_normal((e, 2 * i, h)).astype(np.float32), rng.standard_normal((e, h, i)).astype(np.float32)
    x, logits = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([t, h])), \
        ir.Value(name="r", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([t, e]))
    w1, w2 = ir.Value(name="fc1", const_value=ir.tensor(fc1)), ir.Value(name="fc2", const_value=ir.tensor(fc2))
    attrs = [ir.AttrInt64("k", k), ir.AttrInt64("normalize_routing_weights", renormalize), ir.AttrInt64("swiglu_fusion", 1),
             ir.AttrString("activation_type", "swiglu"), ir.AttrFloat32("activation_alpha", 1.0),
             ir.AttrFloat32("activation_beta", 0.0)]
    moe = ir.Node("com.microsoft", "MoE", [x, logits, w1, None, w2], attributes=attrs, name="moe")
    graph = ir.Graph([x, logits], moe.outputs, nodes=[moe], initializers=[w1, w2], opset_imports={"": 18, "com.microsoft": 1})
    moe.outputs[0].name, moe.outputs[0].type, moe.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([t, h])
    model = ir.Model(graph, ir_version=10)
    assert _quantize_ort(graph, Quantization(f"int{bits}"), {}) == {"QMoE": 1, "MatMulNBits": 0}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    xs, rs = rng.standard_normal((t, h)).astype(np.float32), rng.standard_normal((t, e)).astype(np.float32)
    got = session.run(None, {"x": xs, "r": rs})[0]
    d1 = quantize_rows(fc1, bits, 32, np.float32).dequantize().reshape(e, i, 2, h)  # rows interleaved g0, u0, ...
    d2 = quantize_rows(fc2, bits, 32, np.float32).dequantize()
    probs = np.exp(rs - rs.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = np.zeros((t, h), np.float32)
    for row in range(t):
        ids = np.argsort(-probs[row])[:k]
        weights = probs[row, ids] / (probs[row, ids].sum() if renormalize else 1)
        for expert, weight in zip(ids, weights):
            g, u = d1[expert, :, 0] @ xs[row], d1[expert, :, 1] @ xs[row]
            want[row] += weight * (d2[expert] @ (g / (1 + np.exp(-g)) * u))
    assert np.abs(got - want).max() / np.abs(want).max() <= (EXACT if bits == 4 else QMOE_INT8)


# --- bad requests: one line, before any work ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(quantize="int3"), "unknown --quantize 'int3'"),
    (dict(quantize="int4", block_size=48), "--block-size 48 is not one of"),
    (dict(quantize="int4", block_size=128), "does not divide hidden_size = 64"),  # the tiny model's hidden size
    (dict(quantize="int8", form="portable", lowering="fused"), "no portable form of --lowering fused"),
    (dict(block_size=64), "need --quantize"),
])
def test_bad_quantize_requests_fail_before_any_work(tmp_path, kwargs, message):
    from moe_compile import build

    with pytest.raises(RequestError, match=message) as error:
        build("tiny-qwen2-moe", tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# --- ort form: QMoE + MatMulNBits, every family it serves ----------------------------------------------------

@pytest.mark.parametrize("variant", ORT_VARIANTS)
def test_ort_form_int4(built, checkpoint, variant):
    out = built(variant, form="ort", quantize="int4")
    ops = _ops(out)
    assert "MoE" not in ops and ops["MatMulNBits"] > 0, ops
    manifest = load(out).manifest
    record = manifest.quantization
    assert record["scheme"] == "int4" and record["block_size"] == 32 and not record["unquantized"], record
    assert ops["QMoE"] == record["ops"]["QMoE"] == len(manifest.layers)
    for cls in ("router", "embedding"):  # kept in the build's dtype
        assert record["bytes"].get(cls, {"before": 0, "after": 0})["after"] == record["bytes"].get(cls, {"before": 0})["before"]
    total = {k: sum(row[k] for row in record["bytes"].values()) for k in ("before", "after")}
    assert total["after"] < total["before"]
    check(measure(out, str(checkpoint(variant)), "int4"), "int4", EXACT)


@pytest.mark.parametrize("variant", ["qwen2_moe"])  # int4 covers every family; int8 differs only in its bits (CI time)
def test_ort_form_int8(built, checkpoint, variant):
    out = built(variant, form="ort", quantize="int8")
    assert _ops(out)["QMoE"] > 0
    check(measure(out, str(checkpoint(variant)), "int8"), "int8", None)


# --- portable form: DequantizeLinear, ONNX Runtime and a TensorRT-RTX engine --------------------------------

@pytest.mark.parametrize("variant,scheme", [("qwen2_moe", "int4"), ("qwen2_moe", "int8"), ("mixtral", "int4")])
def test_portable_form(built, checkpoint, variant, scheme):
    from moe_compile.trt import compat

    backend = "trt" if compat.find() is not None else "onnx"
    out = built(variant, form="portable", quantize=scheme, backend=backend)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = _ops(out)
    manifest = load(out).manifest
    assert ops["DequantizeLinear"] == manifest.quantization["ops"]["DequantizeLinear"] > 0
    assert {o.domain: o.version for o in model.opset_import}.get("", 0) == 21 == manifest.opset
    assert not manifest.quantization["unquantized"], manifest.quantization["unquantized"]
    # TensorRT-RTX 1.7.1 segfaults on int4 3-D DequantizeLinear: with an engine, int4 experts ride in int8 storage
    assert ("int4_in_int8" in manifest.quantization) == (backend == "trt" and scheme == "int4")
    check(measure(out, str(checkpoint(variant)), scheme), scheme, EXACT)
    if backend == "trt":  # the engine builds from it; its size is recorded against the quantized bytes
        assert manifest.engine and (out / manifest.engine["file"]).stat().st_size > 0
        quantized = sum(row["after"] for row in manifest.quantization["bytes"].values())
        print(f"{variant} {scheme}: engine {(out / manifest.engine['file']).stat().st_size:,} B, "
              f"weights {quantized:,} B")
