"""Each pass on a tiny captured model: match count, no custom op left, the ONNX ops it emits, and
ONNX Runtime (graph optimisations off) against the unlowered eager model."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_compile.capture import capture
from moe_compile.export.onnx_export import export_onnx
from moe_compile.models.loading import load_model
from moe_compile.passes import LOWERINGS, PassManager
from moe_compile.trt.precision import all_graphs

LOWERING_OPS = {"gather": ("Gather", "ScatterElements"), "dense": ("ScatterElements", "If"), "auto": ("If", None),
                "fused": ("MoE", "If")}
OTHER_PASSES = ("softmax_dtype",)  # tested by test_softmax_runs_in_the_dtype_the_model_asked


@pytest.fixture(scope="module")
def captured(checkpoint):
    model = load_model(checkpoint("qwen2_moe"))
    return model, capture(model, max_batch=2, max_seq=32)


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_lowering(captured, tmp_path, name):
    model, cap = captured
    program, matches = PassManager([name]).run(cap.program)
    assert matches == {name: len(cap.moe_layers)} and len(cap.moe_layers) == 2  # layer 1 of 3 is dense
    path = export_onnx(program, cap.input_names, cap.output_names, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    present, absent = LOWERING_OPS[name]
    assert ops[present] >= 1 and (absent is None or ops[absent] == 0), ops
    names = collections.Counter(n.name for g in all_graphs(graph) for n in g.node)
    assert not [n for n, count in names.items() if count > 1], "node names repeat (across If branches?)"

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for tokens in (1, 12):  # both sides of auto's threshold
        ids = torch.randint(0, 512, (1, tokens))
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, tokens), np.int64),
                 "position_ids": np.arange(tokens)[None]}
        for input_name in cap.input_names[3:]:
            feeds[input_name] = np.zeros((1, 2, 0, 16), np.float32)
        with torch.no_grad():
            expected = model(ids).logits.numpy()
        got = session.run(["logits"], feeds)[0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_unknown_pass_is_named():
    from moe_compile.errors import MoeCompileError

    with pytest.raises(MoeCompileError, match="nope"):
        PassManager(["nope"])


def test_softmax_runs_in_the_dtype_the_model_asked(built):
    """Routers and attention ask for softmax(dtype=float32): in an fp16 build every Softmax takes fp32
    (torch.onnx alone would write a 16-bit Softmax and cast its result)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(built("qwen2_moe", "auto", "fp16") / "model.onnx")))
    values = list(model.graph.value_info) + list(model.graph.input)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 5  # 3 attention layers, 2 MoE routers
    assert {types[n.input[0]] for n in softmaxes} == {onnx.TensorProto.FLOAT}


def _initializer_bytes(graph: onnx.GraphProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for g in all_graphs(graph) for t in g.initializer)


@pytest.mark.parametrize("lowering", ["gather", "dense", "auto"])
def test_onnx_runtime_holds_the_weights_once(built, tmp_path, lowering):
    """ONNX Runtime's optimised graph keeps one copy of the weights: no lowering may feed a weight to an
    op that ORT folds into a second copy while another op still reads the original (a transposed
    expert weight in auto's dense branch did: TensorRT-RTX copied it the same way)."""
    out = built("qwen2_moe", lowering)
    written = _initializer_bytes(onnx.load(str(out / "model.onnx")).graph)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimised = _initializer_bytes(onnx.load(options.optimized_model_filepath).graph)
    assert optimised <= 1.01 * written, f"{optimised / written:.3f}x the written weights"


@pytest.mark.parametrize("lowering", ["gather", "dense", "auto"])
def test_no_gathered_weight_is_a_right_hand_matmul_operand(built, lowering):
    """TensorRT-RTX keeps a second copy of a constant that is MatMul's right-hand operand (directly or
    through a Transpose) when a Gather also reads it (bench/trt_weight_copies.py): no lowering may do both."""
    graph = onnx.load(str(built("qwen2_moe", lowering) / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    nodes = [n for g in all_graphs(graph) for n in g.node]
    transposed = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Transpose" and n.input[0] in weights}
    gathered = {n.input[0] for n in nodes if n.op_type in ("Gather", "GatherND") and n.input[0] in weights}
    right_hand = {transposed.get(n.input[1], n.input[1]) for n in nodes if n.op_type == "MatMul"} & weights
    assert not gathered & right_hand, sorted(gathered & right_hand)
