"""FX -> ONNX through torch.onnx (dynamo path), then small clean-ups on the ONNX IR:
readable dimension names, node names unique across If branches, and an IR version every target
runtime reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch.export import ExportedProgram

from ..errors import MoeCompileError
from . import fused_moe_onnx, gqa_onnx
from .ort_fusions import fuse_for_ort

OPSET = 18
# onnxruntime 1.30 and TensorRT's parser both read IR 10 (ONNX 1.16); newer writers default higher.
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a file at 2 GB; split well before it
# our custom ops -> ONNX Runtime's contrib ops
TRANSLATIONS = {**fused_moe_onnx.TRANSLATIONS, **gqa_onnx.TRANSLATIONS}
DIM_NAMES = {  # (input, axis) -> symbolic dimension name in the ONNX file
    ("input_ids", 0): "batch_size",
    ("input_ids", 1): "sequence_length",
    ("attention_mask", 1): "total_sequence_length",
    ("past_key_values.0.key", 2): "past_sequence_length",
}


def export_onnx(program: ExportedProgram, input_names: list[str], output_names: list[str], path: Path,
                ort_fusions: bool = False, rewrite=None) -> Path:
    """Write `path` (plus `path.data` when the weights exceed 1 GB) and check it. `ort_fusions`: the ort
    form's rewrites into ONNX Runtime's fused ops (export/ort_fusions.py). `rewrite(model)`: a last
    change to the ONNX IR before it is written (the build's weight quantization, moe_compile/quantize/)."""
    args = tuple(spec.arg for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT")
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = [placeholders[a.name].meta["val"] for a in args]
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            optimize=True,
            custom_translation_table=TRANSLATIONS,
            verbose=False,
        )
    except Exception as exc:
        raise MoeCompileError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from exc
    model = onnx_program.model
    rename_dims(model, symbol_names(dict(zip(input_names, user_inputs))))
    if ort_fusions:
        fuse_for_ort(model)
    if rewrite is not None:
        rewrite(model)
    unique_node_names(model)
    model.ir_version = IR_VERSION
    weight_bytes = sum(t.nbytes for t in program.state_dict.values()) + sum(
        t.nbytes for t in program.constants.values() if isinstance(t, torch.Tensor)
    )
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    onnx_program.save(path, external_data=external)
    forget_matched_graphs()
    if not ort_fusions:  # SimplifiedLayerNormalization is ONNX Runtime's op in the default domain, unknown to onnx's
        onnx.checker.check_model(str(path))  # checker; the build's check stage loads the ort form in ONNX Runtime
    return path


def forget_matched_graphs() -> None:
    """onnxscript's rewrite rules are module-level objects whose pattern matchers keep the last graph they matched
    and its match (onnxscript 0.7: SimplePatternMatcher's _graph, _match, _current_node), and through them every
    weight of the export, torch's own and the quantized codes, for as long as the process lives: the build's check
    would load ONNX Runtime's copy beside them. Written, the export lets them go (tests/test_ort_form.py holds that
    no torch weight outlives it). The rules are found in the rewriters' module globals, not by walking the heap."""
    try:
        from onnxscript.rewriter._rewrite_rule import RewriteRule, RewriteRuleSet
    except ImportError:  # another onnxscript: the test says whether it still holds graphs
        return
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("onnxscript.", "torch.onnx.", "moe_compile.")):
            continue
        for value in list(vars(module).values()):
            rules = value.rules if isinstance(value, RewriteRuleSet) else (
                value if isinstance(value, (list, tuple)) else [value])
            for rule in rules:
                matcher = getattr(rule, "_matcher", None) if isinstance(rule, RewriteRule) else None
                for held in ("_graph", "_match", "_current_node"):
                    if hasattr(matcher, held):
                        setattr(matcher, held, None)


def symbol_names(inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map torch's shape symbols (s26, ...) to the names in DIM_NAMES."""
    names = {}
    for (input_name, axis), name in DIM_NAMES.items():
        if input_name in inputs and isinstance(inputs[input_name].shape[axis], torch.SymInt):
            names[str(inputs[input_name].shape[axis])] = name
    return names


def rename_dims(model: ir.Model, names: dict[str, str]) -> None:
    """Rewrite every symbolic dim (inputs, outputs, intermediate values, subgraphs)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None

    def rename(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value and pattern:
            return ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], dim.value))
        return dim

    def fix(value: ir.Value) -> None:
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])

    for value in [*model.graph.inputs, *model.graph.outputs]:
        fix(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            fix(value)


def unique_node_names(model: ir.Model) -> None:
    """torch.onnx names nodes per graph, so the two branches of an If can share a name; TensorRT warns
    on that and error messages naming a node become ambiguous. Suffix repeats with a counter."""
    seen: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not node.name:
            continue
        name, n = node.name, 1
        while name in seen:
            name, n = f"{node.name}_{n}", n + 1
        node.name = name
        seen.add(name)
