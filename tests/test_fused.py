"""The `fused` lowering: one com.microsoft:MoE node per MoE layer, routing inside it where it is softmax ->
top-k [-> renormalise], computed by the graph and handed to it otherwise; `auto` with a logged, recorded
reason where the experts' activation has no form in the op.

Logits and greedy tokens against transformers for every family x `fused` run in test_parity's
matrix (LOWERINGS includes `fused`); these tests check what is particular to the fused form.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_compile.passes import PassManager
from moe_compile.verify import verify

from conftest import VARIANTS

# variant -> renormalisation the node must carry (softmax -> top-k, optionally over the k)
FUSES = {"qwen2_moe": False, "qwen2_moe-renorm": True, "mixtral": True, "qwen3_moe": True, "olmoe": False}


def moe_nodes(out):
    return [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MoE"]


@pytest.mark.parametrize("variant", sorted(FUSES))
def test_one_moe_node_per_layer_with_the_routing_of_the_config(built, checkpoint, variant):
    out = built(variant, "fused")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] and set(manifest["layers"].values()) == {"fused"}, manifest["layers"]
    assert manifest["fallbacks"] == {}
    onnx.checker.check_model(str(out / "model.onnx"))
    nodes = moe_nodes(out)
    assert len(nodes) == len(manifest["layers"])
    graph_ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "TopK" not in graph_ops and "If" not in graph_ops  # routing is inside the MoE nodes
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft"
        assert attrs["normalize_routing_weights"] == int(FUSES[variant])
        assert attrs["k"] == VARIANTS[variant]["num_experts_per_tok"]
        assert (attrs["activation_type"], attrs["swiglu_fusion"]) == (b"swiglu", 1)
        assert (attrs["activation_alpha"], attrs["activation_beta"]) == (1.0, 0.0)
    # Routing inside the op must still choose what transformers chose: greedy tokens identical.
    report = verify(out, model=str(checkpoint(variant)), new_tokens=16)
    assert report.greedy_match and report.relative_error <= 1e-4, report.lines()


def test_torch_backend_runs_the_fused_program(built):
    from moe_compile import load

    out = built("qwen2_moe", "fused")
    program = torch.export.load(str(out / "program.pt2"))
    assert sum(str(n.target) == "moe_compile.fused_moe.default" for n in program.graph.nodes) == 2
    prompts = [[5, 17, 99, 3], [300, 12]]
    ort_tokens = [g.token_ids for g in load(out, "ort").generate(prompts, max_new_tokens=8)]
    assert [g.token_ids for g in load(out, "torch").generate(prompts, max_new_tokens=8)] == ort_tokens


@pytest.mark.parametrize("variant", ["deepseek_v3", "phimoe"])
def test_routing_the_op_cannot_compute_stays_in_the_graph(built, checkpoint, variant):
    """DeepSeek-V3 routes by sigmoid + bias among groups, then scales; PhiMoE by sparsemixer: neither is
    com.microsoft:MoE's softmax -> top-k, so the graph computes the routing and the node takes the result
    (passes/fused.py): still one MoE node a layer and no If, and transformers' logits and greedy tokens."""
    out = built(variant, "fused")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] and set(manifest["layers"].values()) == {"fused"} and manifest["fallbacks"] == {}
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["MoE"] == len(manifest["layers"]) and ops["If"] == 0, ops
    report = verify(out, model=str(checkpoint(variant)), new_tokens=16)
    assert report.greedy_match and report.relative_error <= 1e-4, report.lines()


class Router(torch.nn.Module):
    """A one-layer MoE block with a configurable routing, calling the experts op as capture does."""

    def __init__(self, routing: str, activation="silu", experts=8, hidden=16, inter=8, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.routing, self.activation, self.k = routing, activation, k
        self.bias = torch.nn.Parameter(torch.randn(experts) * 0.1)
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)

    def forward(self, x):
        logits = self.gate(x)
        if self.routing == "topk_softmax":  # GPT-OSS / Granite: softmax over the k logits
            values, ids = torch.topk(logits, self.k, dim=-1)
            weights = torch.softmax(values, dim=-1)
        elif self.routing == "scaled":  # a routed scaling factor after softmax -> top-k
            weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
            weights = weights * 2.5
        elif self.routing == "eps":  # renormalised with +eps in the denominator (DeepSeek)
            weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        elif self.routing == "sigmoid":  # DeepSeek-V3 / GLM-4-MoE: chosen by sigmoid + bias, weighted without it
            scores = torch.sigmoid(logits)
            ids = torch.topk(scores + self.bias, self.k, dim=-1).indices
            weights = scores.gather(1, ids)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
        return torch.ops.moe_compile.experts(x, ids, weights, self.gate_up, self.down, self.activation)


def lower(routing: str, activation: str = "silu"):
    import moe_compile.capture  # noqa: F401  (registers the experts op)

    module = Router(routing, activation)
    x = torch.randn(5, 16)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("tokens", min=1, max=64)},))
    manager = PassManager(["fused"])
    lowered, matches = manager.run(program)
    return module, lowered, matches["fused"], manager.reasons


def test_topk_then_softmax_is_fused_as_renormalised_softmax_topk(tmp_path):
    from moe_compile.export.onnx_export import export_onnx

    module, program, matches, reasons = lower("topk_softmax")
    assert matches == 1 and reasons == {}
    node = next(n for n in program.graph.nodes if str(n.target) == "moe_compile.fused_moe.default")
    assert node.args[5] is True  # renormalise
    path = export_onnx(program, ["x"], ["y"], tmp_path / "m.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MoE"] == 1 and ops["TopK"] == 0, ops
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT must not hide a bad rewrite
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for tokens in (1, 9):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["scaled", "eps", "sigmoid"])
def test_routings_the_op_cannot_compute_stay_in_the_graph(routing, tmp_path):
    """The graph's own top-k ids and weights reach the MoE node as logits (log w at the chosen experts,
    the lowest fp16 elsewhere), its output scaled by the weights' sum: one node, no If, the model's
    numbers, in torch and in ONNX Runtime."""
    from moe_compile.export.onnx_export import export_onnx

    module, program, matches, reasons = lower(routing)
    assert matches == 1 and reasons == {}
    path = export_onnx(program, ["x"], ["y"], tmp_path / "m.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MoE"] == 1 and ops["TopK"] == 1 and ops["If"] == 0, ops
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for tokens in (1, 9):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            expected = module(x)
            torch.testing.assert_close(program.module()(x), expected)
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_an_activation_the_op_cannot_compute_falls_back_to_auto():
    module, program, matches, reasons = lower("scaled", activation="gelu")
    assert matches == 0 and len(reasons) == 1 and "gelu" in next(iter(reasons.values())), reasons
    assert any(n.target is torch.ops.higher_order.cond for n in program.graph.nodes)  # auto's If
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), module(x))


def test_ort_cpu_before_1_32_refuses_fused_builds(built):
    """onnxruntime 1.30/1.31's CPU MoE kernel is wrong (measured: docs/FUSED_MOE.md): the ORT CPU
    backend names the problem instead of running a fused build; auto builds and 1.32 run."""
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime.ort_backend import MissingKernelError, OrtBackend

    fused = OrtBackend(built("qwen2_moe", "fused"), read_manifest(built("qwen2_moe", "fused")))
    with pytest.raises(MissingKernelError, match="1.31.1's CPU MoE kernel gives wrong results"):
        fused._refuse_broken_kernels("1.31.1")
    fused._refuse_broken_kernels("1.32.0")  # fixed there
    OrtBackend(built("qwen2_moe", "auto"), read_manifest(built("qwen2_moe", "auto")))._refuse_broken_kernels("1.31.1")
