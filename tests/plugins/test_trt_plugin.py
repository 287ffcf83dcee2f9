"""The TensorRT MoE plugin: what lies below TensorRT (attributes from the exported node, checks,
workspace, the launch on the GPU) runs everywhere it can; TensorRT itself only where full
TensorRT is importable (never on these machines: see docs/FUSED_MOE.md)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from moe_compile.plugins import build
from moe_compile.plugins.library import Dtype
from moe_compile.plugins.trt_plugin import MoeAttributes, MoeLaunch, PluginError, decode_field

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def as_plugin_fields(node: onnx.NodeProto) -> dict:
    """The node's attributes as TensorRT's ONNX parser hands them to a plugin creator."""
    fields = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            fields[a.name] = np.frombuffer(value, dtype=np.int8)
        elif isinstance(value, float):
            fields[a.name] = np.array([value], dtype=np.float32)
        else:
            fields[a.name] = np.array([value], dtype=np.int32)
    return fields


@pytest.fixture(scope="module")
def moe_node(built):
    out = built("qwen2_moe-renorm", "fused")  # shared with test_fused / test_parity
    return out, next(n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MoE")


def test_exported_node_is_what_the_plugin_serves(moe_node):
    _, node = moe_node
    attributes = MoeAttributes.from_fields(as_plugin_fields(node))
    attributes.check()
    assert (attributes.k, attributes.normalize_routing_weights, attributes.swiglu_fusion) == (2, 1, 1)
    assert attributes.routing.renormalize and attributes.routing.top_k == 2
    assert MoeAttributes.deserialize(attributes.serialize()) == attributes


def test_unsupported_attributes_are_refused_with_the_reason():
    for fields, says in (({"activation_type": b"gelu"}, "activation gelu"),
                         ({"swiglu_limit": np.float32(7.0)}, "swiglu_limit"),
                         ({"swiglu_fusion": np.int32(2)}, "swiglu_fusion 2")):
        base = {"activation_type": np.frombuffer(b"swiglu", np.int8), "swiglu_fusion": np.array([1], np.int32),
                "k": np.array([2], np.int32)}
        base.update({k: np.frombuffer(v, np.int8) if isinstance(v, bytes) else np.array([v]) for k, v in fields.items()})
        with pytest.raises(PluginError, match=says):
            MoeAttributes.from_fields(base).check()


def test_field_decoding():
    assert decode_field(np.frombuffer(b"swiglu\0", np.int8)) == "swiglu"
    assert decode_field(np.array([3], np.int32)) == 3
    assert decode_field(np.array([0.5], np.float32)) == 0.5


def test_bias_inputs_are_refused():
    attributes = MoeAttributes(k=2, activation_type="swiglu", swiglu_fusion=1)
    shapes = [(5, 64), (5, 8), (8, 64, 64), (8, 64), (8, 64, 32)]
    with pytest.raises(PluginError, match="no biases"):
        MoeLaunch.from_shapes(attributes, shapes, Dtype.F32)


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (the workspace size comes from the library)")
def test_workspace_holds_fp32_logits_and_the_launcher_workspace():
    attributes = MoeAttributes(k=4, activation_type="swiglu", swiglu_fusion=1)
    launch = MoeLaunch.from_shapes(attributes, [(7, 2048), (7, 60), (60, 2816, 2048), (60, 2048, 1408)], Dtype.BF16)
    assert launch.tokens == 7 and launch.intermediate == 1408
    from moe_compile.plugins import library

    assert launch.workspace_bytes() >= 7 * 60 * 4 + library.workspace_size(launch.shape(), attributes.routing)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 37])
def test_launch_matches_the_reference_on_the_gpu(dtype, tokens):
    """Exactly what the plugin's enqueue does, from device pointers: interleaved fc1, router
    logits in the model dtype, against the fused op's reference (softmax -> top-k -> renorm)."""
    from moe_compile.plugins.fused_op import _reference

    torch.manual_seed(tokens)
    experts, hidden, inter = 8, 256, 128
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    logits = torch.randn(tokens, experts, device="cuda", dtype=dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).to(dtype)
    fc1 = gate_up.view(experts, 2, inter, hidden).transpose(1, 2).reshape(gate_up.shape).contiguous()
    attributes = MoeAttributes(k=2, normalize_routing_weights=1, activation_type="swiglu", swiglu_fusion=1)
    launch = MoeLaunch.from_shapes(attributes, [tuple(x.shape), tuple(logits.shape), tuple(fc1.shape),
                                                tuple(down.shape)], {torch.float32: Dtype.F32, torch.bfloat16: Dtype.BF16}[dtype])
    out = torch.full_like(x, float("nan"))
    workspace = torch.empty(launch.workspace_bytes(), dtype=torch.uint8, device="cuda")
    launch.enqueue(x.data_ptr(), logits.data_ptr(), fc1.data_ptr(), down.data_ptr(), out.data_ptr(),
                   workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    expected = _reference(x.double(), logits.double(), gate_up.double(), down.double(), 2, True, "silu", None, None,
                          1.0, None)
    rel = ((out.double() - expected).norm() / expected.norm()).item()
    assert rel <= (1e-5 if dtype == torch.float32 else 1e-2), rel


@pytest.mark.skipif(not HAS_TRT, reason="full TensorRT (`tensorrt`) is not importable: it cannot be installed on "
                                        "these machines (TensorRT-RTX aborts on Python plugins)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_tensorrt_parses_builds_and_runs_the_fused_onnx(moe_node):
    import onnxruntime as ort
    import tensorrt as trt

    from moe_compile.plugins.trt_plugin import register

    out, _ = moe_node
    register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out / "model.onnx")), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    feeds = {"input_ids": np.array([[5, 17, 99]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.arange(3)[None]}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name.startswith("past_key_values."):
            shape = tuple(0 if d == -1 and axis == 2 else 1 if d == -1 else d for axis, d in enumerate(tensor.shape))
            feeds[tensor.name] = np.zeros(shape, np.float32)
        shape = feeds[tensor.name].shape
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    buffers = {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(value).cuda()
        context.set_input_shape(name, value.shape)
        context.set_tensor_address(name, buffers[name].data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    expected = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(buffers["logits"].cpu().numpy(), expected, rtol=1e-3, atol=1e-3)
