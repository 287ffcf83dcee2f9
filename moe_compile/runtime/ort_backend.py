"""ONNX Runtime backend. The KV cache stays in OrtValues between steps: each step binds the
previous step's `present.*` outputs as its `past_key_values.*` inputs through IOBinding, so the
cache is never copied through numpy; only the logits come back to the host."""

from __future__ import annotations

import numpy as np

from ..errors import ArtifactError, MoeCompileError
from .backend import Backend

# numpy has no bfloat16: such tensors are created and read as ONNX element types.
_BF16 = 16  # onnx.TensorProto.BFLOAT16


class UnsupportedDtypeError(MoeCompileError):
    """The runtime's provider lacks kernels for the build's dtype."""


class OrtBackend(Backend):
    name = "ort"
    providers = ["CPUExecutionProvider"]

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.out / self.manifest.files[0]), options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            reason = str(exc).splitlines()[0][:200]
            if "NOT_IMPLEMENTED" in reason and self.manifest.dtype == "bf16":
                raise UnsupportedDtypeError(
                    f"ONNX Runtime ({', '.join(self.providers)}) has no bf16 kernel for this graph ({reason.split(': ')[-1]}); "
                    "run this build with --backend torch, or build with --dtype fp16 or fp32"
                ) from None
            raise ArtifactError(f"ONNX Runtime cannot load {self.out / self.manifest.files[0]}: {reason}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.past_names, self.present_names = self.kv_names()
        self.kv_dtype = self.manifest.dtype

    def _reset(self, batch: int) -> None:
        import onnxruntime as ort

        self.past = [self._empty(ort, shape) for shape in self.empty_kv_shapes(batch)]

    def _empty(self, ort, shape):
        if self.kv_dtype == "bf16":
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, _BF16, self.device, 0)
        dtype = np.float16 if self.kv_dtype == "fp16" else np.float32
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)

    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        return outputs[0].numpy()
