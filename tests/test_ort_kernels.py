"""Our fused MoE kernels inside ONNX Runtime: the `moe_compile:FusedMoE` custom op (plugins/ort_csrc)
that `ort-cuda` swaps in for each com.microsoft:MoE node it computes (runtime/ort_kernels.py).

On the CPU: the swap's contract (inputs, attributes, gate/up interleave, routing) against
com.microsoft:MoE as ONNX Runtime's CPU kernel computes it, which nodes are swapped on real builds,
and the one-line reason when the library is missing. With nvcc and onnxruntime's C header: the
library builds and registers. With a CUDA device: a build runs on our kernels and on ORT's MoE, the
same logits within fp16 rounding and the same greedy tokens (bench/gpu_issue11.sh runs these)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoConfig

from moe_compile import load
from moe_compile.plugins.build import find_nvcc, ort_include_dir
from moe_compile.plugins.library import Routing
from moe_compile.plugins.reference import fused_moe_reference, shared_expert_reference
from moe_compile.runtime import ort_kernels

from conftest import VARIANTS, ort_form_variants

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _moe_model(experts=6, hidden=16, inter=8, k=2, normalize=0, **extra) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(7)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) / 4  # rows g0, u0, g1, u1, ...
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32) / 3
    attrs = dict(k=k, normalize_routing_weights=normalize, activation_type="swiglu", swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0, use_sparse_mixer=0) | extra
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden]),
                                              helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", experts])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])],
                              [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    model = _model(graph)
    return model, {"fc1": fc1, "fc2": fc2}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """IR 10: a newer onnx writes its newest IR by default, which onnxruntime 1.31 refuses (at most 13)."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _run_on_cpu(model: onnx.ModelProto, hidden: int, experts: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, logits, ONNX Runtime's CPU output) for 5 random tokens of a one-node MoE or QMoE model."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, hidden)).astype(np.float32)
    logits = rng.standard_normal((5, experts)).astype(np.float32) * 2
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "logits": logits})[0]
    return x, logits, expected


def _concatenated(fc1: torch.Tensor) -> torch.Tensor:
    """fc1's gate/up rows interleaved (g0, u0, g1, ...) as the reference takes them: gate rows, then up rows."""
    return torch.cat([fc1[:, 0::2], fc1[:, 1::2]], dim=1)


@pytest.mark.parametrize("normalize", [0, 1])
def test_fused_moe_contract_is_com_microsoft_moe(normalize):
    """FusedMoE(x, logits, fc1, fc2; k, normalize) as our kernels compute it (the float64 reference, on the
    concatenated gate/up rows) equals ONNX Runtime's CPU com.microsoft:MoE on the node it replaces."""
    model, weights = _moe_model(normalize=normalize)
    x, logits, expected = _run_on_cpu(model, 16)

    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    node = model.graph.node[0]
    assert (node.domain, node.op_type, list(node.input)) == ("moe_compile", "FusedMoE", ["x", "logits", "fc1", "fc2"])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 2, "normalize_routing_weights": normalize}
    gate_up = _concatenated(torch.from_numpy(weights[node.input[2]]))
    ours = fused_moe_reference(torch.from_numpy(x), torch.from_numpy(logits), gate_up, torch.from_numpy(weights["fc2"]),
                               Routing(top_k=attrs["k"], renormalize=bool(normalize)))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def _in_dtype(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """`model` with its float initializers, inputs and outputs in `dtype`, in place."""
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(dtype), init.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model


def _our_cuda_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An ONNX Runtime CUDA session of `model` with our custom-op library registered."""
    path, why = ort_kernels.library()
    assert path is not None, why
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])


def _quantized(model: onnx.ModelProto, scheme: str, dtype=np.float32, level: int = 0) -> onnx.ModelProto:
    """`model` in `dtype`, quantized by our quantizer (quantize/onnx_rewrite.py: MoE -> QMoE, the MatMul/Gemm
    nodes scoped to a quantized class -> MatMulNBits), every quantized op at accuracy_level `level` (0: float
    activations)."""
    import onnx_ir as ir

    from moe_compile.quantize import Quantization
    from moe_compile.quantize.onnx_rewrite import quantize_model

    _in_dtype(model, dtype)
    model_ir = ir.serde.deserialize_model(model)
    quantize_model(model_ir, Quantization(scheme, 32), "ort")
    for node in model_ir.graph:
        if node.op_type in ("QMoE", "MatMulNBits"):
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    model = ir.serde.serialize_model(model_ir)
    model.ir_version = 10  # onnx_ir writes its newest (14), which onnxruntime 1.31 refuses (at most 13)
    return model


def _qmoe_model(scheme: str, normalize: int = 0, dtype=np.float32, experts=6, hidden=64, inter=32, k=2,
                level: int = 0) -> onnx.ModelProto:
    """A one-node com.microsoft:MoE model in `dtype`, quantized into QMoE (_quantized)."""
    model, _ = _moe_model(experts=experts, hidden=hidden, inter=inter, k=k, normalize=normalize)
    return _quantized(model, scheme, dtype, level)


def _dequantized(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> torch.Tensor:
    """Codes [..., N, K·bits/8] or [N, K/block, blob] and their scales, dequantized by quantize/packing.py."""
    from moe_compile.quantize.packing import Blockwise

    return torch.from_numpy(Blockwise(codes.reshape(*scales.shape, block * bits // 8), scales.astype(np.float32), bits,
                                      block).dequantize())


def _qmoe_reference(model: onnx.ModelProto, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """What the FusedQMoE node of a swapped model computes: the float64 reference on its codes dequantized by
    quantize/packing.py, with the shared expert (gated by the last logit column) where the node has one."""
    node = next(n for n in model.graph.node if n.op_type == "FusedQMoE")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, block = attrs["expert_weight_bits"], attrs["block_size"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [_dequantized(inits[codes], inits[scales], bits, block)
               for codes, scales in zip(node.input[2::2], node.input[3::2])]
    routing = Routing(top_k=attrs["k"], renormalize=bool(attrs["normalize_routing_weights"]))
    x, logits = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(logits.astype(np.float32))
    experts = weights[0].shape[0]
    out = fused_moe_reference(x, logits[:, :experts], _concatenated(weights[0]), weights[1], routing)
    if attrs.get("shared_gate"):
        out = out + shared_expert_reference(x, weights[2], weights[3], logits[:, experts])
    return out.numpy()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("normalize", [0, 1])
def test_fused_qmoe_contract_is_com_microsoft_qmoe(scheme, normalize):
    """FusedQMoE(x, logits, fc1 codes, scales, fc2 codes, scales; k, normalize, bits, block) as our kernels
    compute it (the float64 reference on the codes dequantized by quantize/packing.py) equals ONNX Runtime's
    CPU com.microsoft:QMoE on the node it replaces, as our quantizer writes it (with the router Softmax it
    adds where weights are not renormalised, which goes with the swap)."""
    model = _qmoe_model(scheme, normalize)
    x, logits, expected = _run_on_cpu(model, 64)

    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    assert [n.op_type for n in model.graph.node] == ["FusedQMoE"]  # the Softmax went with the QMoE node
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    bits = {"int4": 4, "int8": 8}[scheme]
    assert attrs == {"k": 2, "normalize_routing_weights": normalize, "expert_weight_bits": bits, "block_size": 32}
    ours = _qmoe_reference(model, x, logits)
    tolerance = 1e-4 if bits == 4 else 2e-2  # onnxruntime's 8-bit CPU QMoE rounds activations at every level
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_fused_qmoe_on_cuda_matches_the_dequantized_reference(scheme, tokens, shared):
    """The custom op on ONNX Runtime's CUDA provider, fp16, at 1 and 9 tokens (our decode kernels read the codes)
    and 40 (the experts dequantized first), without and with a quantized shared expert, against the float64
    reference on the same codes. (ONNX Runtime's own CUDA QMoE refuses shapes this small, so it is no reference.)"""
    if shared:
        model = _quantized_shared_expert_model(scheme, np.float16, experts=8, hidden=256, inter=128, shared=256)
    else:
        model = _qmoe_model(scheme, normalize=0, dtype=np.float16, experts=8, hidden=256, inter=128)
    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    assert [n.op_type for n in model.graph.node] == ["FusedQMoE"]
    session = _our_cuda_session(model)
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 256)).astype(np.float16)
    logits = (rng.standard_normal((tokens, 8 + shared)) * 2).astype(np.float16)
    got = session.run(None, {"x": x, "L" if shared else "logits": logits})[0].astype(np.float64)
    expected = _qmoe_reference(model, x, logits)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) <= 1e-2 * np.linalg.norm(expected)


@pytest.mark.parametrize("extra, reason", [({"weights_prepacked": 1}, "prepacked"), ({"block_size": 16}, "block size 16")])
def test_qmoe_nodes_our_kernels_do_not_read_stay_with_the_reason(extra, reason):
    model = _qmoe_model("int4")
    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    for a in node.attribute:
        if a.name in extra:
            a.i = extra[a.name]
    swapped, kept = ort_kernels.swap_moe_nodes(model)
    assert swapped == 0 and reason in kept


def _projection_model(scheme: str, dtype=np.float16, n=200, k=384, bias: str = "add") -> onnx.ModelProto:
    """An attention projection as a quantized ort build writes it: MatMul(x, W [K, N]) then Add of its bias (bias
    "add": the ort form's packed q/k/v), or Gemm with the bias inside ("gemm": MatMulNBits' bias input), or no bias;
    quantized into MatMulNBits by our quantizer."""
    rng = np.random.default_rng(n + k)
    w = {"w": rng.standard_normal((k, n)).astype(np.float32) / k**0.5, "b": rng.standard_normal(n).astype(np.float32)}
    if bias == "gemm":
        w["w"] = np.ascontiguousarray(w["w"].T)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="proj")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["p" if bias == "add" else "y"], name="proj")]
        nodes += [helper.make_node("Add", ["p", "b"], ["y"], name="bias")] if bias == "add" else []
    helper.set_metadata_props(nodes[0], {"pkg.torch.onnx.name_scopes": "['model.layers.0.self_attn.q_proj', 'x']"})
    graph = helper.make_graph(nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])],
                              [numpy_helper.from_array(v, name) for name, v in w.items() if bias or name == "w"])
    return _quantized(_model(graph), scheme, dtype)


def _projection_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """What the moe_compile:MatMulNBits node of a swapped model computes: x times its codes dequantized by
    quantize/packing.py, plus its bias, in float64."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight = _dequantized(inits[node.input[1]], inits[node.input[2]].reshape(attrs["N"], -1), attrs["bits"],
                          attrs["block_size"]).double().numpy()
    bias = inits[node.input[3]].astype(np.float64) if len(node.input) > 3 else 0.0
    return x.astype(np.float64) @ weight.reshape(attrs["N"], attrs["K"]).T + bias


@pytest.mark.parametrize("bias", ["add", "gemm", ""], ids=["bias-add", "bias-input", "no-bias"])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_matmul_nbits_contract_is_com_microsoft_matmul_nbits(scheme, bias):
    """moe_compile:MatMulNBits(A, codes, scales[, bias]; K, N, bits, block_size) as our kernels compute it (x times
    the codes dequantized by quantize/packing.py, plus the bias) equals ONNX Runtime's CPU com.microsoft:MatMulNBits
    and the bias Add after it, which the swap folds into the op."""
    model = _projection_model(scheme, bias=bias)
    x = np.random.default_rng(2).standard_normal((5, 384)).astype(np.float16)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0].astype(np.float64)

    assert ort_kernels.swap_matmul_nodes(model) == (1, "")
    assert [(n.domain, n.op_type) for n in model.graph.node] == [("moe_compile", "MatMulNBits")]  # the Add went in
    node = model.graph.node[0]
    assert len(node.input) == (4 if bias else 3) and node.output[0] == model.graph.output[0].name
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 384, "N": 200, "bits": {"int4": 4, "int8": 8}[scheme], "block_size": 32}
    np.testing.assert_allclose(_projection_reference(model, x), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("change, reason", [("float32", "float32 MatMul"), ("zero points", "zero points"),
                                            ("block 16", "blocks of 16")])
def test_matmul_nbits_nodes_our_kernels_do_not_read_stay_with_the_reason(change, reason):
    model = _projection_model("int4", dtype=np.float32 if change == "float32" else np.float16, bias="")
    node = model.graph.node[0]
    if change == "zero points":
        node.input.extend(["zp"])
    elif change == "block 16":
        next(a for a in node.attribute if a.name == "block_size").i = 16
    swapped, kept = ort_kernels.swap_matmul_nodes(model)
    assert swapped == 0 and reason in kept
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits")


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("bias", ["add", ""], ids=["bias", "no-bias"])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_matmul_nbits_on_cuda_matches_onnxruntime_and_the_reference(scheme, tokens, bias):
    """The custom op on ONNX Runtime's CUDA provider, fp16, against the float64 reference on the same codes and
    against ONNX Runtime's own CUDA MatMulNBits (and bias Add) on the unswapped model."""
    model = _projection_model(scheme, bias=bias, n=2056, k=2048)
    x = np.random.default_rng(tokens).standard_normal((tokens, 2048)).astype(np.float16)
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"]).run(
        None, {"x": x})[0].astype(np.float64)
    assert ort_kernels.swap_matmul_nodes(model) == (1, "")
    session = _our_cuda_session(model)
    got = session.run(None, {"x": x})[0].astype(np.float64)
    expected = _projection_reference(model, x)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) <= 1e-2 * np.linalg.norm(expected)
    assert np.linalg.norm(got - theirs) <= 1e-2 * np.linalg.norm(expected)


def _shared_expert_model(experts=6, hidden=16, inter=8, shared=24, k=2) -> tuple[onnx.ModelProto, dict]:
    """The ort form's Qwen2-MoE MLP: router + shared-gate MatMul and Split, MoE, and the shared expert
    (gate/up MatMul, Split, QuickGelu, Mul, down Gemm) times the gate's sigmoid, added."""
    rng = np.random.default_rng(11)
    w = {"fc1": rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) / 4,
         "fc2": rng.standard_normal((experts, hidden, inter)).astype(np.float32) / 3,
         "router": rng.standard_normal((hidden, experts + 1)).astype(np.float32),
         "shared_gate_up": rng.standard_normal((hidden, 2 * shared)).astype(np.float32) / 4,
         "shared_down": rng.standard_normal((hidden, shared)).astype(np.float32) / 5,
         "router_sizes": np.array([experts, 1], np.int64), "shared_sizes": np.array([shared, shared], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "router"], ["L"]),
        helper.make_node("Split", ["L", "router_sizes"], ["logits", "z"], axis=-1),
        helper.make_node("MatMul", ["x", "shared_gate_up"], ["gu"]),
        helper.make_node("Split", ["gu", "shared_sizes"], ["g", "u"], axis=-1),
        helper.make_node("QuickGelu", ["g"], ["q"], domain="com.microsoft", alpha=1.0),
        helper.make_node("Mul", ["q", "u"], ["a"]),
        helper.make_node("Gemm", ["a", "shared_down"], ["d"], transB=1),
        helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["moe"], domain="com.microsoft", k=k,
                         normalize_routing_weights=0, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                         activation_beta=0.0),
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("Mul", ["s", "d"], ["m"]),
        helper.make_node("Add", ["moe", "m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "moe_shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])],
                              [numpy_helper.from_array(v, name) for name, v in w.items()])
    model = _model(graph)
    return model, w


def _quantized_shared_expert_model(scheme: str, dtype=np.float32, experts=6, hidden=64, inter=32, shared=64,
                                   level: int = 0, router: bool = False) -> onnx.ModelProto:
    """_shared_expert_model quantized as a Qwen2-MoE build is (its projections scoped to the shared expert, so
    they become MatMulNBits; QMoE with the router Softmax), with the router's logits L as the graph's input, or
    (`router`) its MatMul kept, unquantized as a build keeps it."""
    model, _ = _shared_expert_model(experts, hidden, inter, shared)
    if not router:
        model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "router"))
        del model.graph.input[:]
        model.graph.input.extend([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden]),
                                  helper.make_tensor_value_info("L", TensorProto.FLOAT, ["T", experts + 1])])
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{i}"  # as the exporter names them: the quantized initializers are named after them
        if node.op_type in ("MatMul", "Gemm"):
            scope = "gate" if node.input[1] == "router" else "shared_expert"
            helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": f"['model.layers.0.mlp.{scope}', 'x']"})
    return _quantized(model, scheme, dtype, level)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_the_quantized_shared_expert_moves_into_the_fused_op(scheme):
    """FusedQMoE(x, [router | shared gate] logits, fc1, fc2 codes and scales, the shared expert's MatMulNBits codes
    and scales; shared_gate=1) as our kernels compute it (the float64 references on packing.py's dequantized
    weights) equals ONNX Runtime's CPU run of the nodes it replaces: QMoE, its Softmax, two MatMulNBits, Split,
    QuickGelu, Mul, Sigmoid, Mul, Add and the router's Split."""
    model = _quantized_shared_expert_model(scheme)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2
    rng = np.random.default_rng(5)
    x, logits = rng.standard_normal((7, 64)).astype(np.float32), rng.standard_normal((7, 7)).astype(np.float32) * 2
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "L": logits})[0]

    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    assert [n.op_type for n in model.graph.node] == ["FusedQMoE"]
    fused = model.graph.node[0]
    assert list(fused.input[:2]) == ["x", "L"] and len(fused.input) == 10 and fused.output[0] == "y"
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    assert attrs["shared_gate"] == 1 and attrs["expert_weight_bits"] == {"int4": 4, "int8": 8}[scheme]
    tolerance = 1e-4 if scheme == "int4" else 2e-2  # onnxruntime's 8-bit CPU QMoE rounds activations at every level
    np.testing.assert_allclose(_qmoe_reference(model, x, logits), expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max())


def test_the_shared_expert_moves_into_the_fused_op():
    """FusedMoE(x, [router | shared gate] logits, fc1, fc2, shared gate/up rows, shared down; shared_gate=1) as
    our kernels compute it (the float64 references) equals ONNX Runtime's CPU run of the nine nodes it replaces."""
    model, w = _shared_expert_model()
    x = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    assert [n.op_type for n in model.graph.node] == ["Transpose", "MatMul", "FusedMoE"]
    transpose, router, fused = model.graph.node
    assert (transpose.input[0], list(helper.get_attribute_value(transpose.attribute[0]))) == ("shared_gate_up", [1, 0])
    assert list(fused.input) == ["x", "L", "fc1", "fc2", transpose.output[0], "shared_down"] and fused.output[0] == "y"
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute} == {
        "k": 2, "normalize_routing_weights": 0, "shared_gate": 1}
    logits = torch.from_numpy(x @ w["router"])
    fc1 = torch.from_numpy(w["fc1"])
    routed = fused_moe_reference(torch.from_numpy(x), logits[:, :6], _concatenated(fc1),
                                 torch.from_numpy(w["fc2"]), Routing(top_k=2))
    shared = shared_expert_reference(torch.from_numpy(x), torch.from_numpy(w["shared_gate_up"].T),
                                     torch.from_numpy(w["shared_down"]), logits[:, 6])
    np.testing.assert_allclose((routed + shared).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int4"])
def test_the_router_matmul_moves_into_the_fused_op(quantized):
    """fold_router_matmuls: the MatMul(x, [router | shared gate]) that only the fused op reads goes into it as the
    weight's rows (a Transpose of the initializer, which the session folds) with router_rows=1; those rows are the
    router's, row E the shared gate's."""
    model = _quantized_shared_expert_model("int4", router=True) if quantized else _shared_expert_model()[0]
    router = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "router"))
    ort_kernels.swap_moe_nodes(model)
    assert ort_kernels.fold_router_matmuls(model) == 1
    op = "FusedQMoE" if quantized else "FusedMoE"
    assert [n.op_type for n in model.graph.node if n.op_type != "Transpose"] == [op]
    fused = next(n for n in model.graph.node if n.op_type == op)
    transpose = next(n for n in model.graph.node if n.output[0] == fused.input[1])
    assert transpose.op_type == "Transpose" and transpose.input[0] == "router"
    assert list(helper.get_attribute_value(transpose.attribute[0])) == [1, 0]
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    assert attrs["router_rows"] == 1 and attrs["shared_gate"] == 1
    folded = helper.make_graph([transpose], "rows", [], [helper.make_tensor_value_info(transpose.output[0],
                                                                                       TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(router, "router")])
    rows = ort.InferenceSession(_model(folded).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(rows, router.T)  # [E + 1, H]: the kernel's rows, the gate's last


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("scheme", ["fp16", "int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_the_folded_router_on_cuda_matches_the_router_matmul(scheme, tokens):
    """The fused op with its router MatMul folded in (our kernel computes the logits and the shared gate's from the
    rows) against the same op fed by ONNX Runtime's MatMul, fp16 on CUDA, with the shared expert: at 1 token (the
    gate/up launch starts as the router launch's programmatic dependent), 9 and 40."""
    if scheme == "fp16":
        model = _in_dtype(_shared_expert_model(experts=8, hidden=256, inter=128, shared=256)[0], np.float16)
    else:
        model = _quantized_shared_expert_model(scheme, np.float16, experts=8, hidden=256, inter=128, shared=256,
                                               router=True)
    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    unfolded = onnx.ModelProto()
    unfolded.CopyFrom(model)
    assert ort_kernels.fold_router_matmuls(model) == 1
    x = np.random.default_rng(tokens).standard_normal((tokens, 256)).astype(np.float16)
    got, expected = (_our_cuda_session(m).run(None, {"x": x})[0].astype(np.float64) for m in (model, unfolded))
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) <= 1e-2 * np.linalg.norm(expected)


@pytest.mark.parametrize("change", ["logits read elsewhere", "another input", "computed weight", "wrong width"])
def test_a_router_of_another_shape_stays_a_matmul(change):
    model, w = _shared_expert_model()
    ort_kernels.swap_moe_nodes(model)
    router = next(n for n in model.graph.node if n.op_type == "MatMul")
    if change == "logits read elsewhere":
        model.graph.output.append(helper.make_tensor_value_info("L", TensorProto.FLOAT, ["T", 7]))
    elif change == "another input":
        model.graph.node.insert(0, helper.make_node("Neg", ["x"], ["x_neg"]))
        router.input[0] = "x_neg"
    elif change == "computed weight":
        model.graph.node.insert(0, helper.make_node("Identity", ["router"], ["router_copy"]))
        router.input[1] = "router_copy"
    else:
        init = next(i for i in model.graph.initializer if i.name == "router")
        init.CopyFrom(numpy_helper.from_array(np.concatenate([w["router"], w["router"][:, :1]], 1), "router"))
    assert ort_kernels.fold_router_matmuls(model) == 0
    assert any(n.op_type == "MatMul" and n.output[0] == "L" for n in model.graph.node)
    fused = next(n for n in model.graph.node if n.op_type == "FusedMoE")
    assert fused.input[1] == "L" and "router_rows" not in {a.name for a in fused.attribute}


@pytest.mark.parametrize("change", ["two consumers", "gated output read elsewhere", "gelu", "no gate"])
def test_a_shared_expert_of_another_shape_stays_in_the_graph(change):
    """Anything but the exact pattern keeps the shared expert's nodes; the MoE node is still swapped."""
    model, _ = _shared_expert_model()
    nodes = model.graph.node
    if change == "two consumers":  # the shared expert's output is read elsewhere too
        model.graph.output.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, ["T", 16]))
    elif change == "gated output read elsewhere":
        model.graph.node.append(helper.make_node("Neg", ["m"], ["m_neg"]))
        model.graph.output.append(helper.make_tensor_value_info("m_neg", TensorProto.FLOAT, ["T", 16]))
    elif change == "gelu":
        next(n for n in nodes if n.op_type == "QuickGelu").attribute[0].f = 1.702
    else:
        sigmoid = next(n for n in nodes if n.op_type == "Sigmoid")
        sigmoid.op_type = "Tanh"
    assert ort_kernels.swap_moe_nodes(model) == (1, "")
    ops = [n.op_type for n in model.graph.node]
    assert "FusedMoE" in ops and "Gemm" in ops and "Transpose" not in ops
    fused = next(n for n in model.graph.node if n.op_type == "FusedMoE")
    assert len(fused.input) == 4 and fused.output[0] == "moe"


@pytest.mark.parametrize("extra, reason", [
    ({"activation_alpha": 1.702}, "scaled or clamped"),
    ({"swiglu_limit": 7.0}, "scaled or clamped"),
    ({"swiglu_fusion": 2}, "fusion 2"),
    ({"use_sparse_mixer": 1}, "sparse-mixer"),
])
def test_nodes_our_kernels_do_not_compute_stay_with_the_reason(extra, reason):
    model, _ = _moe_model(**extra)
    swapped, kept = ort_kernels.swap_moe_nodes(model)
    assert swapped == 0 and reason in kept
    assert model.graph.node[0].op_type == "MoE"


def test_expert_biases_stay_on_com_microsoft_moe():
    model, _ = _moe_model()
    model.graph.node[0].input[3] = "fc1_bias"
    assert ort_kernels.swap_moe_nodes(model) == (0, "expert biases")


@pytest.mark.parametrize("variant", ort_form_variants())
def test_every_silu_moe_node_of_an_ort_build_is_swapped(built, variant):
    out = built(variant, form="ort")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    before = sum(n.op_type == "MoE" for n in model.graph.node)
    swapped, kept = ort_kernels.swap_moe_nodes(model)
    assert (swapped, kept) == (before, "")  # the ort form's families all route by softmax into SiLU experts
    assert not any(n.op_type == "MoE" for n in model.graph.node)
    assert any(o.domain == "moe_compile" for o in model.opset_import) or before == 0
    config = AutoConfig.for_model(**VARIANTS[variant])
    if getattr(config, "shared_expert_intermediate_size", 0):  # Qwen2-MoE: the shared expert went in with it
        fused = [n for n in model.graph.node if n.op_type == "FusedMoE"]
        assert all(len(n.input) == 6 for n in fused) and not any(n.op_type == "Sigmoid" for n in model.graph.node)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_every_qmoe_node_of_a_quantized_ort_build_is_swapped(built, scheme):
    out = built("qwen2_moe", form="ort", quantize=scheme)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    before = sum(n.op_type == "QMoE" for n in model.graph.node)
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert before and ort_kernels.swap_moe_nodes(model) == (before, "")
    ops = [n.op_type for n in model.graph.node]
    assert "QMoE" not in ops and ops.count("FusedQMoE") == before
    assert ops.count("Softmax") == softmaxes - before  # qwen2_moe does not renormalise: each QMoE had its Softmax
    fused = [n for n in model.graph.node if n.op_type == "FusedQMoE"]
    assert all(len(n.input) == 10 for n in fused) and "Sigmoid" not in ops  # the shared expert went in with it
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert matmuls and all(n.domain == "com.microsoft" for n in matmuls)  # the fp32 build's stay on ONNX Runtime's
    assert ort_kernels.swap_matmul_nodes(model) == (0, "a float32 MatMul (ours take 16-bit activations)")


def _bias_as_add(model: onnx.ModelProto) -> None:
    """Each MatMulNBits' bias input as an Add after it, as builds before 2026-12-03 have it."""
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "MatMulNBits" and len(node.input) > 5 and node.input[5]:
            bias, out = node.input[5], node.output[0]
            del node.input[3:]
            node.output[0] = f"{out}.unbiased"
            nodes.append(helper.make_node("Add", [node.output[0], bias], [out], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_every_matmul_nbits_node_of_a_quantized_fp16_ort_build_is_swapped(built, scheme):
    """An fp16 quantized build: every MatMulNBits (attention projections, Qwen2-MoE's dense MLP layers) goes on our
    kernels with the q/k/v bias, which the build gives as MatMulNBits' bias input (older builds: an Add after it)."""
    model = onnx.load(str(built("qwen2_moe", dtype="fp16", form="ort", quantize=scheme) / "model.onnx"),
                      load_external_data=False)
    ort_kernels.swap_moe_nodes(model)
    older = onnx.ModelProto()
    older.CopyFrom(model)
    _bias_as_add(older)
    for graph in (model, older):
        before = sum(n.op_type == "MatMulNBits" for n in graph.graph.node)
        assert before and ort_kernels.swap_matmul_nodes(graph) == (before, "")
        matmuls = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        assert len(matmuls) == before and all(n.domain == "moe_compile" for n in matmuls)
        products = {n.output[0] for n in matmuls}
        assert sum(len(n.input) == 4 for n in matmuls) == sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
        assert not [n.name for n in graph.graph.node if n.op_type == "Add" and products & set(n.input)]


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_qwen2_moe_layers_on_our_kernels_stay_under_twelve_nodes(built, quantize):
    """What ort-cuda runs (issue 11's target: 12 nodes a Qwen2-MoE layer): the build's 19 less the shared
    expert's nine that the fused op takes over (int4: the same, and the router Softmax QMoE needed). Counted as
    test_ort_form counts the build's graph; the Transposes of initializers that the swap adds are folded by
    ONNX Runtime when the session starts."""
    model = onnx.load(str(built("qwen2_moe", form="ort", quantize=quantize) / "model.onnx"), load_external_data=False)
    ort_kernels.swap_moe_nodes(model)
    nodes = [n for n in model.graph.node if n.op_type != "Transpose"]
    norms = [i for i, n in enumerate(nodes) if n.op_type.endswith("SimplifiedLayerNormalization")]
    per_layer = [sum(n.op_type not in ("Shape", "Concat") for n in nodes[a:b]) for a, b in zip(norms[0::2], norms[2::2])]
    assert per_layer and max(per_layer) <= 12, per_layer


@pytest.mark.parametrize("keep", ["", "MOE", "MATMUL", "ATTENTION", "ROUTER", "NORM", "TOPK"])
def test_each_kind_of_node_can_stay_on_onnxruntime(built, tmp_path, monkeypatch, keep):
    """prepare() on an fp16 int4 build: every kind of node swapped (MoE with its router MatMul, MatMulNBits,
    GroupQueryAttention, SkipSimplifiedLayerNormalization, the sampler's TopK with its ArgMax), or one kind kept on
    ONNX Runtime's by its switch (MOE_COMPILE_{MOE,MATMUL,ATTENTION,ROUTER,NORM,TOPK}_KERNELS=ort), the others
    swapped."""
    out = built("qwen2_moe", dtype="fp16", form="ort", quantize="int4")
    library = tmp_path / "libmoe_compile_ort.so"
    library.write_bytes(b"")  # prepare only names the library; the session loads it
    monkeypatch.setenv("MOE_COMPILE_ORT_OPS_LIB", str(library))
    for which in ("MOE", "MATMUL", "ATTENTION", "ROUTER", "NORM", "TOPK"):
        monkeypatch.delenv(f"MOE_COMPILE_{which}_KERNELS", raising=False)
    if keep:
        monkeypatch.setenv(f"MOE_COMPILE_{keep}_KERNELS", "ort")
    swap = ort_kernels.prepare(out / "model.onnx")
    ours = {(n.domain, n.op_type) for n in swap.model.graph.node if n.domain == "moe_compile"}
    theirs = {n.op_type for n in swap.model.graph.node if n.domain == "com.microsoft"}
    layers = sum(n.op_type == "GroupQueryAttention" for n in swap.model.graph.node)
    assert layers and swap.attentions == (0 if keep == "ATTENTION" else layers)
    for kind, count, op, their_op in (("MOE", swap.swapped, "FusedQMoE", "QMoE"),
                                      ("MATMUL", swap.matmuls, "MatMulNBits", "MatMulNBits"),
                                      ("ATTENTION", swap.attentions, "GroupQueryAttention", "GroupQueryAttention"),
                                      ("NORM", swap.norms, "SkipSimplifiedLayerNormalization",
                                       "SkipSimplifiedLayerNormalization")):
        kept = keep == kind
        assert (count > 0, ("moe_compile", op) in ours, their_op in theirs) == (not kept, not kept, kept), kind
    fused = [n for n in swap.model.graph.node if n.op_type == "FusedQMoE"]
    routers = [n for n in swap.model.graph.node if n.op_type == "MatMul" and {n.output[0]} & {f.input[1] for f in fused}]
    folded = keep not in ("MOE", "ROUTER")
    assert swap.routers == (len(fused) if folded else 0) and len(routers) == (0 if folded else len(fused))
    assert all(("router_rows" in {a.name for a in f.attribute}) == folded for f in fused)
    norms = [n for n in swap.model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert swap.norms == (0 if keep == "NORM" else len(norms)) == (0 if keep == "NORM" else 2 * layers)
    samplers = [(n.domain, n.op_type, list(n.output)) for n in swap.model.graph.node if n.op_type in ("TopK", "ArgMax")]
    if keep == "TOPK":
        assert swap.top_ks == 0 and sorted(op for _, op, _ in samplers) == ["ArgMax", "TopK"], samplers
    else:  # one op of ours, the graph's three token outputs its outputs
        assert swap.top_ks == 1 and samplers == [("moe_compile", "TopK", ["top_logits", "top_ids", "next_token"])]


def _sampler_model(n=512, k=64, argmax=True, **top_k_attrs) -> onnx.ModelProto:
    """The ort form's tail: logits (a float32 graph output) -> TopK(K) -> top_logits, top_ids; ArgMax -> next_token."""
    nodes = [helper.make_node("Identity", ["h"], ["logits"]),
             helper.make_node("TopK", ["logits", "k"], ["top_logits", "top_ids"], axis=-1, **top_k_attrs)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", n]),
               helper.make_tensor_value_info("top_logits", TensorProto.FLOAT, ["B", k]),
               helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["B", k])]
    if argmax:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["next_token"], axis=-1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("next_token", TensorProto.INT64, ["B"]))
    graph = helper.make_graph(nodes, "sampler", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", n])],
                              outputs, [numpy_helper.from_array(np.array([k], np.int64), "k")])
    return _model(graph)


@pytest.mark.parametrize("argmax", [True, False], ids=["with-argmax", "top-k-alone"])
def test_the_sampler_becomes_one_top_k_of_ours(argmax):
    model = _sampler_model(argmax=argmax)
    assert ort_kernels.swap_top_k_nodes(model) == (1, "")
    (node,) = [n for n in model.graph.node if n.op_type != "Identity"]
    assert (node.domain, node.op_type, list(node.input)) == ("moe_compile", "TopK", ["logits"])
    assert list(node.output) == ["top_logits", "top_ids"] + (["next_token"] if argmax else [])
    assert helper.get_attribute_value(node.attribute[0]) == 64


def test_two_top_ks_over_the_logits_share_no_argmax():
    model = _sampler_model()
    model.graph.node.append(helper.make_node("TopK", ["logits", "k"], ["again_logits", "again_ids"], axis=-1))
    assert ort_kernels.swap_top_k_nodes(model) == (2, "")
    outputs = [list(n.output) for n in model.graph.node if n.op_type == "TopK"]
    assert outputs == [["top_logits", "top_ids", "next_token"], ["again_logits", "again_ids"]]


@pytest.mark.parametrize("change, reason", [({"largest": 0}, "largest, sorted"), ({"sorted": 0}, "largest, sorted"),
                                            ({"k": 65}, "constant K from 1 to 64"), ({"input": "h"}, "float32 logits")])
def test_top_k_nodes_our_kernels_do_not_compute_stay_with_the_reason(change, reason):
    change = dict(change)
    model = _sampler_model(k=change.pop("k", 64), **{key: v for key, v in change.items() if key != "input"})
    if "input" in change:  # a TopK over a value that is no graph output (the router's, in other forms)
        model.graph.node[1].input[0] = change["input"]
    swapped, why = ort_kernels.swap_top_k_nodes(model)
    assert swapped == 0 and reason in why and [n.op_type for n in model.graph.node] == ["Identity", "TopK", "ArgMax"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("rows, n, k", [(1, 151936, 64), (4, 151936, 64), (3, 512, 64), (2, 1000, 5)])
def test_top_k_on_cuda_matches_onnxruntime(rows, n, k):
    """Our TopK against ONNX Runtime's TopK and ArgMax on the CUDA provider, on logits with ties (values on a grid of
    halves): the same values and argmax, and the ids in the order ONNX specifies (ties to the lower index)."""
    rng = np.random.default_rng(rows * n + k)
    h = np.round(rng.standard_normal((rows, n)).astype(np.float32) * 8) / 2
    model = _sampler_model(n=n, k=k)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"]).run(None, {"h": h})
    assert ort_kernels.swap_top_k_nodes(model)[0] == 1
    logits, top_logits, top_ids, next_token = _our_cuda_session(model).run(None, {"h": h})
    assert np.array_equal(logits, expected[0]) and np.array_equal(top_logits, expected[1])
    assert np.array_equal(next_token, expected[3])
    assert np.array_equal(top_ids, np.argsort(-h, axis=-1, kind="stable")[:, :k])


def test_every_switch_at_ort_loads_nothing(built, monkeypatch):
    """Norms alone are not swapped either (MOE_COMPILE_NORM_KERNELS unset): without our other ops they keep no chain
    of ours, and the build runs as it is."""
    monkeypatch.delenv("MOE_COMPILE_NORM_KERNELS", raising=False)
    for which in ("MOE", "MATMUL", "ATTENTION"):
        monkeypatch.setenv(f"MOE_COMPILE_{which}_KERNELS", "ort")
    swap = ort_kernels.prepare(built("qwen2_moe", dtype="fp16", form="ort", quantize="int4") / "model.onnx")
    assert swap.model is None and swap.library is None and "ATTENTION" in swap.reason


def test_a_missing_library_is_one_reason_and_ort_kernels_run(built, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPILE_KERNELS_DIR", str(tmp_path))  # no library built there
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(tmp_path))  # and no header to build it with
    monkeypatch.delenv("MOE_COMPILE_ORT_OPS_LIB", raising=False)
    swap = ort_kernels.prepare(built("qwen2_moe", form="ort") / "model.onnx")
    assert swap.model is None and "libmoe_compile_ort.so is not built" in swap.reason and "--ort-include" in swap.reason
    monkeypatch.setenv("MOE_COMPILE_ORT_OPS_LIB", str(tmp_path / "nothing.so"))
    assert "is no file" in ort_kernels.prepare(built("qwen2_moe", form="ort") / "model.onnx").reason


@pytest.mark.skipif(find_nvcc() is None or ort_include_dir() is None,
                    reason="building the custom-op library needs nvcc and onnxruntime_c_api.h ($ONNXRUNTIME_INCLUDE_DIR)")
def test_the_library_builds_and_registers(tmp_path):
    from moe_compile.plugins.build import build_ort_op

    library = build_ort_op(out_dir=tmp_path, archs=("90",))
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    for model, op in ((_moe_model()[0], "FusedMoE"), (_qmoe_model("int4"), "FusedQMoE"),
                      (_projection_model("int4"), "MatMulNBits"), (_gqa_model()[0], "GroupQueryAttention"),
                      (_norm_model(), "SkipSimplifiedLayerNormalization"), (_sampler_model(), "TopK")):
        ort_kernels.swap_moe_nodes(model)
        ort_kernels.swap_matmul_nodes(model)
        ort_kernels.swap_attention_nodes(model)
        ort_kernels.swap_norm_nodes(model)
        ort_kernels.swap_top_k_nodes(model)
        if not HAS_CUDA:  # the ops have CUDA kernels only: the CPU provider must say so, not run something else
            with pytest.raises(Exception, match=op):
                ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _prompt_logits(compiled, prompt: list[int]) -> np.ndarray:
    backend = compiled.backend
    backend.reset(1)
    ids = np.array([prompt], np.int64)
    return backend.step(ids, np.ones_like(ids), np.arange(len(prompt))[None])


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue11.sh)")
@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen2_moe-renorm", "mixtral"])
def test_our_kernels_and_ort_moe_agree_on_a_build(built, monkeypatch, variant):
    out = built(variant, dtype="fp16", form="ort")
    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12]]
    monkeypatch.setenv("MOE_COMPILE_MOE_KERNELS", "ort")
    theirs = load(out, "ort-cuda")
    assert theirs.backend.moe_kernels == "onnxruntime"
    expected_logits = _prompt_logits(theirs, prompts[0])
    expected = [g.token_ids for g in theirs.generate(prompts, max_new_tokens=16)]
    del theirs
    monkeypatch.delenv("MOE_COMPILE_MOE_KERNELS")
    ours = load(out, "ort-cuda")  # CUDA graphs on
    assert ours.backend.moe_kernels == "moe_compile"
    logits = _prompt_logits(ours, prompts[0])
    assert np.isfinite(logits).all()
    assert np.abs(logits - expected_logits).max() <= 1e-2 * np.abs(expected_logits).max()
    assert [g.token_ids for g in ours.generate(prompts, max_new_tokens=16)] == expected



@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
def test_our_top_k_and_ort_top_k_give_the_same_tokens_on_a_build(built, monkeypatch):
    """A build's generation on ort-cuda (CUDA graphs) with the sampler on our TopK against ONNX Runtime's TopK and
    ArgMax: the same greedy tokens (next_token) and the same top-k sampled ones (top_logits/top_ids, one seed),
    batches of two prompts of different lengths."""
    out = built("qwen2_moe", dtype="fp16", form="ort")
    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12]]
    runs = {"greedy": {}, "sampled": {"temperature": 0.8, "top_k": 40, "seed": 3}}
    monkeypatch.setenv("MOE_COMPILE_TOPK_KERNELS", "ort")
    theirs = load(out, "ort-cuda")
    expected = {name: [g.token_ids for g in theirs.generate(prompts, max_new_tokens=16, **how)]
                for name, how in runs.items()}
    del theirs
    monkeypatch.delenv("MOE_COMPILE_TOPK_KERNELS")  # ours: the default
    ours = load(out, "ort-cuda")
    for name, how in runs.items():
        assert [g.token_ids for g in ours.generate(prompts, max_new_tokens=16, **how)] == expected[name], name


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("variant", ["qwen2_moe", "glm4_moe"])
def test_our_attention_and_ort_gqa_agree_on_a_build(built, monkeypatch, variant):
    """A build's decode on ort-cuda (CUDA graphs) with our attention kernels against ONNX Runtime's: prompt logits
    within 1% of their largest (the op's prefill is ONNX Runtime's kernel, invoked; on the H200 the session's own
    node and the invoked one differed by up to 0.02 in a tiny model's logits) and the same greedy tokens (16 decode
    steps, batches 1 and 2 of different lengths)."""
    out = built(variant, dtype="fp16", form="ort")
    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12]]
    monkeypatch.setenv("MOE_COMPILE_ATTENTION_KERNELS", "ort")
    theirs = load(out, "ort-cuda")
    expected_logits = _prompt_logits(theirs, prompts[0])
    expected = [g.token_ids for g in theirs.generate(prompts, max_new_tokens=16)]
    expected_one = theirs.generate([prompts[1]], max_new_tokens=16)[0].token_ids
    del theirs
    monkeypatch.delenv("MOE_COMPILE_ATTENTION_KERNELS")  # ours: the default
    ours = load(out, "ort-cuda")
    assert ort_kernels.prepare(out / "model.onnx").attentions > 0
    logits = _prompt_logits(ours, prompts[0])
    assert np.isfinite(logits).all()
    assert np.abs(logits - expected_logits).max() <= 1e-2 * np.abs(expected_logits).max()
    assert [g.token_ids for g in ours.generate(prompts, max_new_tokens=16)] == expected
    assert ours.generate([prompts[1]], max_new_tokens=16)[0].token_ids == expected_one

def _gqa_model(heads=4, kv_heads=2, head=32, max_seq=160, rotary_half=8, dtype=np.float16,
               **extra) -> tuple[onnx.ModelProto, dict]:
    """One com.microsoft:GroupQueryAttention node as the ort form writes it (packed QKV, shared KV buffer, half-split
    rotary from cos/sin initializers)."""
    rng = np.random.default_rng(11)
    angles = np.arange(max_seq)[:, None] * (1e4 ** (-np.arange(rotary_half) / rotary_half))[None]
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    cache = ["batch", kv_heads, max_seq, head]
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=0.9 / head ** 0.5, do_rotary=1, rotary_interleaved=0)
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_length",
                                                    "cos", "sin"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", **(attrs | extra))
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("qkv", elem, ["batch", "new", (heads + 2 * kv_heads) * head]),
         helper.make_tensor_value_info("past_key", elem, cache), helper.make_tensor_value_info("past_value", elem, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", elem, ["batch", "new", heads * head]),
         helper.make_tensor_value_info("present_key", elem, cache),
         helper.make_tensor_value_info("present_value", elem, cache)],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    rows = len(extra.get("lengths", ())) or 3
    feeds = {"qkv": rng.standard_normal((rows, 1, (heads + 2 * kv_heads) * head)).astype(dtype),
             "past_key": rng.standard_normal((rows, kv_heads, max_seq, head)).astype(dtype),
             "past_value": rng.standard_normal((rows, kv_heads, max_seq, head)).astype(dtype),
             "seqlens_k": np.array([4, 70, 150][:rows], np.int32), "total_length": np.array(max_seq, np.int32)}
    return _model(graph), feeds | {"cos": cos, "sin": sin, "heads": heads, "scale": attrs["scale"]}


def _gqa_reference(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from moe_compile.plugins.reference import decode_attention_reference

    t = {name: torch.from_numpy(case[name]) for name in ("qkv", "past_key", "past_value", "seqlens_k", "cos", "sin")}
    out, k, v = decode_attention_reference(t["qkv"][:, 0], t["past_key"], t["past_value"], t["seqlens_k"], t["cos"],
                                           t["sin"], case["heads"], case["scale"])
    return out.numpy()[:, None], k.numpy(), v.numpy()


def test_decode_attention_contract_is_com_microsoft_gqa():
    """The reference our decode kernels are tested against computes what ONNX Runtime's GroupQueryAttention does
    for one new token a row over a shared KV buffer: rotary at position seqlens_k, the token written there,
    attention over positions 0..seqlens_k (rows whose length crosses 64-row chunks and one that does not)."""
    model, case = _gqa_model()
    names = ("qkv", "past_key", "past_value", "seqlens_k", "total_length")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, present_k, present_v = session.run(None, {n: case[n] for n in names})
    expected_out, expected_k, expected_v = _gqa_reference(case)
    np.testing.assert_allclose(out.astype(np.float32), expected_out.astype(np.float32), atol=2e-3, rtol=2e-3)
    for b, length in enumerate(case["seqlens_k"] + 1):  # what ONNX Runtime holds past the rows is its own business
        np.testing.assert_allclose(present_k[b, :, :length].astype(np.float32),
                                   expected_k[b, :, :length].astype(np.float32), atol=2e-3)
        np.testing.assert_array_equal(present_v[b, :, :length], expected_v[b, :, :length])


@pytest.mark.parametrize("extra, reason", [({"rotary_interleaved": 1}, "interleaved rotary"),
                                           ({"softcap": 30.0}, "softcap"), ({"local_window_size": 8}, "local_window"),
                                           ({"head": 48}, "head size 48"), ({"heads": 6, "kv_heads": 2}, "6 heads")])
def test_attention_nodes_our_kernels_do_not_compute_stay_with_the_reason(extra, reason):
    model, _ = _gqa_model(**{k: v for k, v in extra.items() if k in ("head", "heads", "kv_heads")},
                          **{k: v for k, v in extra.items() if k not in ("head", "heads", "kv_heads")})
    swapped, kept = ort_kernels.swap_attention_nodes(model)
    assert swapped == 0 and reason in kept
    assert model.graph.node[0].domain == "com.microsoft"


@pytest.mark.parametrize("variant", ort_form_variants())
def test_every_attention_node_of_an_fp16_ort_build_is_swapped(built, variant):
    model = onnx.load(str(built(variant, dtype="fp16", form="ort") / "model.onnx"), load_external_data=False)
    before = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    swapped, kept = ort_kernels.swap_attention_nodes(model)
    assert before and (swapped, kept) == (before, "")  # the tiny models' head sizes are 16 and 32
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.domain == "moe_compile" and len(n.input) == 9 and len(n.output) == 3 for n in attention)


def _run_in_place(session, case: dict) -> list[np.ndarray]:
    """One GroupQueryAttention session run on CUDA with present_* bound to past_*'s buffers, as the runtime binds
    the KV cache: out, then the caches as the run left them."""
    binding = session.io_binding()
    feeds = {n: ort.OrtValue.ortvalue_from_numpy(case[n], "cuda", 0)
             for n in ("qkv", "past_key", "past_value", "seqlens_k")}
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_cpu_input("total_length", case["total_length"])
    binding.bind_output("out", "cuda")
    binding.bind_ortvalue_output("present_key", feeds["past_key"])
    binding.bind_ortvalue_output("present_value", feeds["past_value"])
    session.run_with_iobinding(binding)
    return [binding.get_outputs()[0].numpy(), feeds["past_key"].numpy(), feeds["past_value"].numpy()]


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (bench/gpu_issue12.sh)")
@pytest.mark.parametrize("head, heads, kv_heads", [(16, 4, 2), (128, 16, 16), (64, 32, 4)])
def test_attention_on_cuda_matches_the_reference_and_onnxruntime(head, heads, kv_heads):
    """moe_compile:GroupQueryAttention in an ONNX Runtime CUDA session: a decode step, past and present bound to one
    buffer (as the runtime binds them) and run plainly, against the reference; a prefill of 5 tokens (ONNX Runtime's
    kernel, invoked by the op) against com.microsoft:GroupQueryAttention's own session."""
    # ONNX Runtime's CUDA kernel (the prefill below) takes a rotary width of 8 pairs or more
    model, case = _gqa_model(heads=heads, kv_heads=kv_heads, head=head, rotary_half=max(head // 4, 8))
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    assert ort_kernels.swap_attention_nodes(swapped) == (1, "")
    ours = _our_cuda_session(swapped)
    names = ("qkv", "past_key", "past_value", "seqlens_k", "total_length")
    expected = _gqa_reference(case)
    got = ours.run(None, {n: case[n] for n in names})
    for value, reference in zip(got, expected):
        np.testing.assert_allclose(value.astype(np.float32), reference.astype(np.float32), atol=2e-3, rtol=2e-3)
    for value, reference in zip(_run_in_place(ours, case), expected):
        np.testing.assert_allclose(value.astype(np.float32), reference.astype(np.float32), atol=2e-3, rtol=2e-3)

    rng = np.random.default_rng(5)
    prefill = {"qkv": rng.standard_normal((2, 5, case["qkv"].shape[2])).astype(np.float16),
               "past_key": np.zeros_like(case["past_key"][:2]), "past_value": np.zeros_like(case["past_value"][:2]),
               "seqlens_k": np.array([4, 2], np.int32), "total_length": np.array(5, np.int32)}
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    expected = theirs.run(None, prefill)
    for value, reference in zip(ours.run(None, prefill), expected):
        np.testing.assert_array_equal(value, reference)
    for value, reference in zip(_run_in_place(ours, prefill), _run_in_place(theirs, prefill)):
        np.testing.assert_array_equal(value, reference)


def _norm_model(dtype=np.float16, hidden=64, bias=True, outputs=("y", "", "", "sum"), epsilon=1e-5) -> onnx.ModelProto:
    """One com.microsoft:SkipSimplifiedLayerNormalization node as the ort form writes it (gamma an initializer, the
    sum read by the next layer, mean and inv_std_var read by nothing), with a bias where asked."""
    rng = np.random.default_rng(hidden)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {"gamma": 1 + 0.1 * rng.standard_normal(hidden), "bias": 0.1 * rng.standard_normal(hidden)}
    node = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"] + (["bias"] if bias else []),
                            list(outputs), domain="com.microsoft", name="norm", epsilon=epsilon)
    graph = helper.make_graph(
        [node], "norm", [helper.make_tensor_value_info(name, elem, ["T", hidden]) for name in ("x", "skip")],
        [helper.make_tensor_value_info(name, elem, ["T", hidden]) for i, name in enumerate(outputs) if i in (0, 3)],
        [numpy_helper.from_array(w.astype(dtype), name) for name, w in weights.items() if bias or name == "gamma"])
    return _model(graph)


@pytest.mark.parametrize("outputs", [("y", "", "", "sum"), ("y", "mean", "inv_std_var", "sum"), ("y",)],
                         ids=["empty", "unread", "absent"])
def test_a_skip_norm_swaps_with_its_inputs_outputs_and_epsilon(outputs):
    """The same inputs, epsilon and outputs 0 and 3; mean and inv_std_var, which the ort form names but nothing reads,
    left empty (our op computes neither)."""
    model = _norm_model(outputs=outputs)
    assert ort_kernels.swap_norm_nodes(model) == (1, "")
    node = model.graph.node[0]
    assert (node.domain, node.op_type, node.name) == ("moe_compile", "SkipSimplifiedLayerNormalization", "norm")
    assert list(node.input) == ["x", "skip", "gamma", "bias"]
    assert list(node.output) == ["y", "", "", "sum"][:len(outputs)]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"epsilon": pytest.approx(1e-5)}
    assert any(o.domain == "moe_compile" for o in model.opset_import)


@pytest.mark.parametrize("change, reason", [({"dtype": np.float32}, "float32 norm"),
                                            ({"outputs": ("y", "", "inv_std_var", "sum")}, "mean or inv_std_var"),
                                            ({"hidden": 12}, "over 12 elements")])
def test_norm_nodes_our_kernel_does_not_compute_stay_with_the_reason(change, reason):
    model = _norm_model(**change)
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in change.get("outputs", ())[1:3] if name)  # read
    swapped, kept = ort_kernels.swap_norm_nodes(model)
    assert swapped == 0 and reason in kept
    assert model.graph.node[0].domain == "com.microsoft"


def _with_float32_io(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """The one-node norm model read and written as float32 through Casts (numpy has no bfloat16), in place."""
    elem = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    norm = onnx.NodeProto()
    norm.CopyFrom(model.graph.node[0])
    inputs = [helper.make_node("Cast", [name], [f"{name}.{dtype}"], to=elem) for name in ("x", "skip")]
    norm.input[0], norm.input[1] = inputs[0].output[0], inputs[1].output[0]
    outputs = [name for name in norm.output if name]
    for i, name in enumerate(norm.output):
        if name:
            norm.output[i] = f"{name}.{dtype}"
    del model.graph.node[:]
    outputs = [helper.make_node("Cast", [f"{name}.{dtype}"], [name], to=TensorProto.FLOAT) for name in outputs]
    model.graph.node.extend(inputs + [norm] + outputs)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 9, 128])
def test_skip_norm_on_cuda_matches_onnxruntimes(dtype, rows):
    """moe_compile:SkipSimplifiedLayerNormalization in an ONNX Runtime CUDA session against the node it replaces on
    ONNX Runtime's own CUDA kernel: the output and the sum within one step of the 16-bit type's rounding."""
    model = _norm_model(dtype=np.float16, hidden=2048)
    if dtype == "bfloat16":
        for init in model.graph.initializer:
            values = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(helper.make_tensor(init.name, TensorProto.BFLOAT16, values.shape, values.ravel()))
    _with_float32_io(model, dtype)
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    assert ort_kernels.swap_norm_nodes(swapped) == (1, "")
    ours = _our_cuda_session(swapped)
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    rng = np.random.default_rng(rows)
    feeds = {name: rng.standard_normal((rows, 2048)).astype(np.float32) for name in ("x", "skip")}
    step = 2**-10 if dtype == "float16" else 2**-7
    for got, expected in zip(ours.run(None, feeds), theirs.run(None, feeds)):
        np.testing.assert_allclose(got, expected, rtol=step, atol=step)
