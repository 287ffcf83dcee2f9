"""ONNX Runtime backends: `ort` (CPU provider) and `ort-cuda` (CUDA provider), one code path.

The KV cache lives where the provider computes, for the whole generation. `reset` allocates two
buffers per KV tensor, each long enough for `max_seq` tokens, on the provider's device; every step
binds the first `P` positions of one as `past_key_values.*` and lets the graph write `present.*`
(`P + S` positions) straight into the other, then the two swap roles. No allocation, no copy and no
host round trip of the cache between steps: IOBinding with raw buffer pointers, the same calls on
'cpu' and 'cuda'. A `[B, H, P, D]` tensor is contiguous, so any `P <= max_seq` is a prefix of the
buffer. Logits stay on the device too; only the rows asked for (the last position, for the decode
loop) are copied to the host.

    step t:   past ── buffer A[:B·H·P·D]  ──▶ graph ──▶ present ── buffer B[:B·H·(P+S)·D]
    step t+1: past ── buffer B             ──▶ graph ──▶ present ── buffer A

The portable past/present form copies the cache once per step inside the graph (the concat); an
in-place form (a shared KV buffer, ONNX Runtime's GroupQueryAttention) also fixes every address and
shape, which CUDA-graph replay needs: builds of the ort form run on the variants in ort_inplace.py.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import ArtifactError, MoeCompileError
from ..export.manifest import ONNX_FILE
from . import ort_kernels
from .backend import Backend
from .memory import memory_for
from .ort_install import import_onnxruntime

# ONNX element types (onnx.TensorProto): numpy has no bfloat16, so buffers are typed by these.
_ONNX_TYPES = {"fp32": (1, 4), "fp16": (10, 2), "bf16": (16, 2)}
log = logging.getLogger("moe_compile")
FUSED_CPU_MIN = "1.32"  # the first onnxruntime whose CPU com.microsoft:MoE is right (fused and ort-form builds)
XQA_SWITCH = "ORT_ENABLE_XQA"  # onnxruntime's environment switch for GroupQueryAttention's XQA decode kernel


class MissingKernelError(MoeCompileError):
    """The runtime's provider lacks a kernel, or a correct one, for this build (bf16 ops; the CPU MoE before 1.32)."""


class ProviderUnavailableError(MoeCompileError):
    """The installed onnxruntime lacks the execution provider this backend needs."""


class OrtBackend(Backend):
    name = "ort"
    provider = "CPUExecutionProvider"
    device = "cpu"
    moe_kernels: str | None = None  # who runs the MoE nodes where there is a choice (ort-cuda: ort_kernels.py)

    def provider_options(self) -> dict:
        return {}

    def session_options(self, options) -> None:
        """Hook for subclasses (profiling, thread counts); the defaults are ONNX Runtime's."""

    def model_source(self, options) -> str | bytes:
        """What the session loads: model.onnx's path, or (subclasses) a rewritten graph of it as bytes."""
        return str(self.out / ONNX_FILE)

    def _refuse_broken_kernels(self, version: str) -> None:
        """onnxruntime before 1.32: the CPU com.microsoft:MoE is wrong, silently. Measured with 1.30.0 and
        1.31.1: zeros in fp16, and 0.95 relative logits error on the tiny Qwen2-MoE build in fp32 (a
        one-layer MoE alone was right there). Its CUDA kernel matched ours on the H100 (1.31.1)."""
        from packaging.version import Version

        fused = "fused" in self.manifest.layers.values()
        if fused and self.provider == "CPUExecutionProvider" and Version(version) < Version(FUSED_CPU_MIN):
            raise MissingKernelError(
                f"onnxruntime {version}'s CPU MoE kernel gives wrong results for this fused build (fixed in 1.32); "
                "upgrade onnxruntime, run this build with --backend ort-cuda or torch, or build with --lowering auto"
            )

    def _activate(self) -> None:
        self._open_session()
        self.buffers: list[list] = [[], []]
        self.capacity = 0  # batch rows the buffers hold at max_seq

    def _open_session(self) -> None:
        """The session on this backend's provider, and what every form binds: device, KV names and types."""
        ort = import_onnxruntime()
        if self.provider not in ort.get_available_providers():
            raise ProviderUnavailableError(
                f"backend '{self.name}' needs ONNX Runtime's {self.provider}, but onnxruntime {ort.__version__} here offers "
                f"{', '.join(ort.get_available_providers())}; on a CUDA machine: pip uninstall -y onnxruntime && "
                "pip install 'moe-compile[gpu]'; or use --backend ort"
            )
        self._refuse_broken_kernels(ort.__version__)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # A quantized portable build's DequantizeLinear -> MatMul: ONNX Runtime fuses it into MatMulNBits with int8
        # activations by default (accuracy level 4: ~0.5% a matmul, measured); 0 keeps the build's dtype (issue 12)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session_options(options)
        providers = [(self.provider, self.provider_options())]
        if self.provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # for the shape arithmetic ONNX Runtime keeps on the host
        path = self.out / ONNX_FILE
        try:
            self.session = ort.InferenceSession(self.model_source(options), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            reason = str(exc).splitlines()[0][:200]
            if "NOT_IMPLEMENTED" in reason and self.manifest.dtype == "bf16":
                raise MissingKernelError(
                    f"ONNX Runtime ({self.provider}) has no bf16 kernel for this graph ({reason.split(': ')[-1]}); "
                    "run this build with --backend torch, or build with --dtype fp16 or fp32"
                ) from None
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {reason}") from None
        if self.session.get_providers()[0] != self.provider:
            raise ProviderUnavailableError(f"backend '{self.name}': ONNX Runtime could not start {self.provider} (no device?)")
        self.memory = memory_for(self.device)
        self.past_names, self.present_names = self.kv_names()
        self.kv_type, self.kv_itemsize = _ONNX_TYPES[self.manifest.dtype]
        self.kv_dims = [dims for layer in self.manifest.kv["layers"] for dims in layer]  # (heads, head_dim) per tensor

    def _reset(self, batch: int) -> None:
        import onnxruntime as ort

        if batch > self.capacity:
            self.require_kv_memory(batch, copies=2, held_rows=self.capacity)
            self.buffers = [[], []]  # free the old ones first
            self.buffers = [
                [
                    ort.OrtValue.ortvalue_from_shape_and_type((batch * heads * self.manifest.max_seq * dim,),
                                                              self.kv_type, self.device, 0)
                    for heads, dim in self.kv_dims
                ]
                for _ in range(2)
            ]
            self.capacity = batch
        self.current = 0  # which buffer set holds the past

    def _run(self, input_ids, attention_mask, position_ids):
        """One graph run; returns the logits OrtValue (on the device) and its shape."""
        batch, new = input_ids.shape
        past, present = self.buffers[self.current], self.buffers[1 - self.current]
        binding = self.session.io_binding()
        binding.bind_output("logits", self.device)  # first: get_outputs()[0]
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        for name, buffer, (heads, dim) in zip(self.past_names, past, self.kv_dims):
            binding.bind_input(name, self.device, 0, self.kv_type, [batch, heads, self.length, dim], buffer.data_ptr())
        for name, buffer, (heads, dim) in zip(self.present_names, present, self.kv_dims):
            shape = [batch, heads, self.length + new, dim]
            binding.bind_output(name, self.device, 0, self.kv_type, shape, buffer.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the provider's stream is done before anything reads the buffers
        self.current = 1 - self.current
        logits = binding.get_outputs()[0]
        return logits, logits.shape()

    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        logits, (batch, new, vocab) = self._run(input_ids, attention_mask, position_ids)
        out = np.empty((batch * new, vocab), np.float32)
        return self.memory.copy_rows(out, logits.data_ptr(), vocab * 4, batch * new).reshape(batch, new, vocab)

    def _step_last(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        logits, (batch, new, vocab) = self._run(input_ids, attention_mask, position_ids)
        out = np.empty((batch, vocab), np.float32)
        return self.memory.copy_rows(out, logits.data_ptr() + (new - 1) * vocab * 4, new * vocab * 4, batch)

    def kv_buffer(self, index: int) -> np.ndarray:
        """The cache tensor `index` (past/present order) as the next step will read it, copied to the host
        as raw ONNX-typed elements (for tests and debugging)."""
        heads, dim = self.kv_dims[index]
        shape = (self.batch, heads, self.length, dim)
        raw = np.empty((int(np.prod(shape[:3])), dim * self.kv_itemsize), np.uint8)
        self.memory.copy_rows(raw, self.buffers[self.current][index].data_ptr(), raw.strides[0], raw.shape[0])
        dtype = {1: np.float32, 10: np.float16}.get(self.kv_type, np.uint16)
        return raw.view(dtype).reshape(shape)


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    device = "cuda"

    def provider_options(self) -> dict:
        return {
            "device_id": 0,
            # fp32 builds promise fp32 arithmetic (parity with transformers); TF32 matmuls would not keep it.
            "use_tf32": 0 if self.manifest.dtype == "fp32" else 1,
            "arena_extend_strategy": "kSameAsRequested",  # grow by what is asked: peak memory stays meaningful
        }

    def session_options(self, options) -> None:
        # GroupQueryAttention's decode step: onnxruntime 1.31's XQA kernel took 12.0 us a layer at batch 1
        # where its flash-decoding path (cuDNN) takes 9.2 (H200, A2.7B: 330 vs 300 tok/s in one run,
        # docs/BENCHMARKS.md). ONNX Runtime reads this switch from the environment when the session
        # creates its kernels; a value the user set is kept.
        os.environ.setdefault(XQA_SWITCH, "0")

    def model_source(self, options) -> str | bytes:
        """model.onnx with its MoE nodes on our kernels where the custom-op library is at hand (ort_kernels.py)."""
        swap = ort_kernels.prepare(self.out / ONNX_FILE)
        if swap.model is None:
            self.moe_kernels = None if swap.reason == ort_kernels.NO_MOE_NODES else "onnxruntime"
            if self.moe_kernels:
                log.info("MoE nodes on onnxruntime's com.microsoft:MoE: %s", swap.reason)
            return super().model_source(options)
        self.moe_kernels = "moe_compile" if swap.swapped else "onnxruntime"
        options.register_custom_ops_library(str(swap.library))
        # the graph comes as bytes: ONNX Runtime finds its external data in the build's folder
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.out))
        kept = f" (kept on onnxruntime's: {swap.reason})" if swap.reason else ""
        matmuls = f", {swap.matmuls} quantized MatMuls" if swap.matmuls else ""
        attentions = f", {swap.attentions} attention nodes" if swap.attentions else ""
        routers = f" ({swap.routers} with their router MatMul)" if swap.routers else ""
        norms = f", {swap.norms} norms" if swap.norms else ""
        top_ks = f", {swap.top_ks} TopK" if swap.top_ks else ""
        log.info("%d MoE nodes%s%s%s%s%s on moe_compile's CUDA kernels%s", swap.swapped, routers, matmuls, attentions,
                 norms, top_ks, kept)
        return swap.model.SerializeToString()
