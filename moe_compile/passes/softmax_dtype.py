"""Softmax in the dtype the model asked for.

transformers writes `softmax(x, dim, dtype=torch.float32)` for routers and eager attention: the
exponentials and their sum in fp32 even when x is fp16/bf16. torch.onnx translates `aten.softmax`
with a dtype as a 16-bit Softmax followed by a Cast, so a 16-bit build would route experts on 16-bit
probabilities. This pass casts the input first and drops the dtype argument: Cast, then an fp32 Softmax.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .base import Pass, PassResult

_SOFTMAXES = (torch.ops.aten.softmax.int, torch.ops.aten.log_softmax.int)


class SoftmaxDtype(Pass):
    name = "softmax_dtype"
    description = "softmax(x, dtype=float32) on 16-bit x -> softmax(x.to(float32)), so ONNX computes it in fp32"

    def _apply(self, program: ExportedProgram) -> PassResult:
        count = 0
        for module in program.graph_module.modules():  # includes the branches of torch.cond
            if not isinstance(module, torch.fx.GraphModule):
                continue
            graph = module.graph
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target not in _SOFTMAXES or len(node.args) < 3:
                    continue
                source, dim, dtype = node.args[:3]
                if dtype is None or source.meta["val"].dtype == dtype:
                    continue
                with graph.inserting_before(node):
                    cast = graph.call_function(torch.ops.aten._to_copy.default, (source,), {"dtype": dtype})
                cast.meta = {**source.meta, "val": source.meta["val"].to(dtype)}
                node.args = (cast, dim)
                count += 1
            module.recompile()
        if count == 0:
            return PassResult(program, 0, skipped="no softmax with a dtype unlike its input's")
        return PassResult(program, count)
