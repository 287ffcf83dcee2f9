"""Torch backends: run the captured, lowered program (program.pt2) eagerly, on the CPU (`torch`,
the reference) or on a CUDA GPU (`torch-cuda`, where the `fused` lowering's op runs our kernels)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ArtifactError, MoeCompileError
from ..models.loading import DTYPES
from .backend import Backend

PROGRAM_FILE = "program.pt2"


class TorchBackend(Backend):
    name = "torch"
    device = "cpu"

    def _activate(self) -> None:
        from .. import capture  # noqa: F401  (registers the op a fused/unlowered program may call)
        from ..plugins import fused_op  # noqa: F401  (the `fused` lowering's op; on CUDA, our kernels)

        path = self.out / PROGRAM_FILE
        if self.manifest.form != "portable":
            raise ArtifactError(f"{self.out} is a build of the {self.manifest.form} form, which only ONNX Runtime runs; "
                                f"backend '{self.name}' reads portable builds (moe-compile build --form portable)")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (built with --no-torch-program?): backend '{self.name}' needs the "
                                "program that 'moe-compile build' saves; rebuild without that flag or use --backend ort")
        # Export records size-oblivious guards such as batch != 1 that the graph does not depend on
        # (ONNX Runtime serves those sizes from the same graph; the parity tests cover batch 1).
        program = torch.export.load(str(path))
        if self.device != "cpu":
            if not torch.cuda.is_available():
                raise MoeCompileError(f"backend '{self.name}' needs a CUDA GPU visible to torch; use --backend torch")
            from torch.export.passes import move_to_device_pass

            # The program was traced on the CPU: devices baked into it (arange, zeros) move with the weights.
            program = move_to_device_pass(program, self.device)
        self.module = program.module(check_guards=False)

    def _reset(self, batch: int) -> None:
        dtype = DTYPES[self.manifest.dtype]
        self.past = [torch.zeros(shape, dtype=dtype, device=self.device) for shape in self.empty_kv_shapes(batch)]

    @torch.no_grad()
    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        inputs = [torch.from_numpy(a).to(self.device) for a in (input_ids, attention_mask, position_ids)]
        logits, *self.past = self.module(*inputs, *self.past)
        return logits.cpu().numpy()


class TorchCudaBackend(TorchBackend):
    name = "torch-cuda"
    device = "cuda"
