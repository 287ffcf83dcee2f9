"""Passes over the captured ExportedProgram: registered by name, run in order by a small manager.

A pass subclass writes only `_apply`, returning a `PassResult`; `__call__` times it and logs one
line `[passes] name: matches=N`. A pass that finds nothing to do says why (`skipped`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import ClassVar

import torch
from torch.export import ExportedProgram

from ..errors import MoeCompileError

log = logging.getLogger("moe_compile.passes")

PASSES: dict[str, type[Pass]] = {}

# Ops whose output shape depends on tensor values: none may survive lowering.
DATA_DEPENDENT_OPS = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}


@dataclasses.dataclass
class PassResult:
    program: ExportedProgram
    matches: int
    skipped: str | None = None
    # Per MoE layer (experts module path), for a pass that chooses per layer: the lowering it got,
    # and why it did not get the pass's own one (a fallback).
    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)


class Pass:
    name: ClassVar[str]
    description: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            PASSES[cls.name] = cls

    def __init__(self, **options):
        self.options = options

    def __call__(self, program: ExportedProgram) -> PassResult:
        start = time.perf_counter()
        result = self._apply(program)
        note = f" (skipped: {result.skipped})" if result.skipped else ""
        log.info("[passes] %s: matches=%d in %.2fs%s", self.name, result.matches, time.perf_counter() - start, note)
        return result

    def _apply(self, program: ExportedProgram) -> PassResult:
        raise NotImplementedError


def op_nodes(program: ExportedProgram, op) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == op]


def data_dependent_nodes(program: ExportedProgram) -> list[str]:
    """Nodes whose output shape depends on data: data-dependent ops or unbacked (u*) sizes."""
    found = []
    for module in program.graph_module.modules():  # includes the branches of torch.cond
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            op_name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            val = node.meta.get("val")
            unbacked = isinstance(val, torch.Tensor) and any(
                isinstance(d, torch.SymInt) and str(d).startswith("u") for d in val.shape
            )
            if op_name in DATA_DEPENDENT_OPS or unbacked:
                found.append(f"{node.name} ({op_name})")
    return found


class PassManager:
    def __init__(self, pipeline: list[str], **options):
        unknown = [name for name in pipeline if name not in PASSES]
        if unknown:
            raise MoeCompileError(f"unknown pass(es) {unknown}; registered passes: {', '.join(sorted(PASSES))}")
        self.pipeline = pipeline
        self.options = options
        self.layers: dict[str, str] = {}  # MoE layer -> lowering, where a pass chose per layer
        self.reasons: dict[str, str] = {}  # MoE layer -> why it fell back

    def run(self, program: ExportedProgram) -> tuple[ExportedProgram, dict[str, int]]:
        matches = {}
        for name in self.pipeline:
            result = PASSES[name](**self.options)(program)
            program, matches[name] = result.program, result.matches
            self.layers.update(result.layers)
            self.reasons.update(result.reasons)
        leftovers = op_nodes(program, torch.ops.moe_compile.experts.default) + data_dependent_nodes(program)
        if leftovers:
            raise MoeCompileError(f"after passes {self.pipeline} the graph still has data-dependent nodes: {leftovers}")
        return program, matches


def list_passes() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(PASSES.items())}
