"""Torch reference backend: runs the captured, lowered program (program.pt2) eagerly."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ArtifactError
from ..models.loading import DTYPES
from .backend import Backend

PROGRAM_FILE = "program.pt2"


class TorchBackend(Backend):
    name = "torch"

    def _activate(self) -> None:
        from .. import capture  # noqa: F401  (registers the op a fused/unlowered program may call)

        path = self.out / PROGRAM_FILE
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the torch backend needs the program saved by 'moe-compile build'")
        # Export records size-oblivious guards such as batch != 1 that the graph does not depend on
        # (ONNX Runtime serves those sizes from the same graph; the parity tests cover batch 1).
        self.module = torch.export.load(str(path)).module(check_guards=False)

    def _reset(self, batch: int) -> None:
        dtype = DTYPES[self.manifest.dtype]
        self.past = [torch.zeros(shape, dtype=dtype) for shape in self.empty_kv_shapes(batch)]

    @torch.no_grad()
    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        logits, *self.past = self.module(
            torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(position_ids), *self.past
        )
        return logits.numpy()
