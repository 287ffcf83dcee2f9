"""Shared machinery of the MoE lowerings: replace every `moe_compile::experts` node by a
decomposition, through `ExportedProgram.run_decompositions` (torch retraces the replacement
into ATen ops, so a lowering is written as ordinary torch code)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.export import ExportedProgram

from .base import Pass, PassResult, op_nodes


class LoweringPass(Pass):
    def lowering(self) -> Callable:
        raise NotImplementedError

    def _apply(self, program: ExportedProgram) -> PassResult:
        op = torch.ops.moe_compile.experts.default
        count = len(op_nodes(program, op))
        if count == 0:
            return PassResult(program, 0, skipped="no MoE experts in the graph")
        return PassResult(program.run_decompositions({op: self.lowering()}), count)
