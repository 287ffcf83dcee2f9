"""ONNX Runtime on builds of the ort form (manifest.form "ort"): `ort` and `ort-cuda` pick these variants.

GroupQueryAttention updates the KV cache in place and the graph ends in ArgMax and TopK, so a decode
step moves only token ids across the bus, and every address and shape of a decode step is fixed,
which lets ort-cuda replay it as a CUDA graph.

    reset(B)  one buffer per KV tensor, [capacity, kv_heads, max_seq, head_dim], allocated once (grown
              for a larger batch) and bound as both past_key_values.i and present.i: GQA writes in place
    prefill   the loop's left-padded rows -> right-padded [B, S] with mask [B, S]; bound afresh, uncaptured
    decode    input_ids [B, 1] and mask [B, max_seq] (row b: ones on the n_b slots it fills after this
              step) in fixed OrtValues updated in place, outputs in fixed OrtValues: one binding per batch
              size, built once, on ort-cuda replayed as that batch size's CUDA graph (gpu_graph_id)
    host      next_token [B] (greedy), top_logits/top_ids [B, C] (top_k <= C), else the logits rows

ONNX Runtime captures a graph id once it has seen enough regular runs (two in the CUDA provider,
counted over all ids in some versions), so each batch size's first WARMUP decode steps run uncaptured
(gpu_graph_id -1) with the very shapes its graph will have: the arena holds their memory before the
capture. Growing the KV buffers drops every binding; the new ones take new graph ids (ONNX Runtime
cannot forget a captured graph, and the old ones point into freed buffers). On the CPU the run
option is ignored and the same calls run.

Seen on the H200 (onnxruntime-gpu 1.31.1): a tiny Qwen2-MoE fp16 ort-form build decodes in 0.27 ms a
step with CUDA graphs and 1.38 ms without, the same tokens (greedy and sampled, batches 1 and 3). The
session refuses graphs when a host value feeds a CUDA node (a MemcpyFromHost); fp32 builds cannot run
here at all (no fp32 CUDA GroupQueryAttention).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ..errors import ArtifactError, MoeCompileError, RequestError
from .ort_backend import MissingKernelError, OrtBackend, OrtCudaBackend
from .sampling import Chooser

GRAPH_OPTION = "gpu_graph_id"  # ONNX Runtime run option: which CUDA graph a run captures or replays; -1 = none


@dataclasses.dataclass
class _Decode:
    """One batch size's decode step: fixed inputs and outputs, bound once."""

    binding: object  # onnxruntime IOBinding
    inputs: dict  # input_ids [B, 1], attention_mask [B, max_seq]: OrtValues updated in place
    outputs: dict  # logits, next_token, top_logits, top_ids: OrtValues every step of this batch size writes
    options: object  # RunOptions with this batch size's graph id (None without CUDA graphs)
    runs: int = 0


class OrtInplaceBackend(OrtBackend):
    form = "ort"
    WARMUP = 2  # uncaptured decode steps of a batch size before its graph id

    def _activate(self) -> None:
        self._open_session()
        self.heads = {"logits": (np.float32, (self.manifest.vocab_size,)), "next_token": (np.int64, ()),
                      "top_logits": (np.float32, (self.manifest.sampling_candidates,)),
                      "top_ids": (np.int64, (self.manifest.sampling_candidates,))}
        self.slots = np.arange(self.manifest.max_seq)
        self.kv: list = []  # one OrtValue per KV tensor
        self.capacity = 0
        self.decodes: dict[int, _Decode] = {}
        self.graph_ids = itertools.count(1)  # 0 is ONNX Runtime's default id
        self.uncaptured = self._options(-1)

    def _options(self, graph_id: int):
        if not self.cuda_graph:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry(GRAPH_OPTION, str(graph_id))
        return options

    def _reset(self, batch: int) -> None:
        import onnxruntime as ort

        if batch > self.capacity:
            self.require_kv_memory(batch, copies=1, held_rows=self.capacity)
            self.decodes, self.kv = {}, []  # bindings into the old buffers go first, then the buffers
            for heads, dim in self.kv_dims:
                size = batch * heads * self.manifest.max_seq * dim
                buffer = ort.OrtValue.ortvalue_from_shape_and_type((size,), self.kv_type, self.device, 0)
                self.memory.zero(buffer.data_ptr(), size * self.kv_itemsize)  # GQA reads only filled slots; no NaN garbage
                self.kv.append(buffer)
            self.capacity = batch

    def _bind_cache_and_outputs(self, binding, batch: int, outputs: dict) -> None:
        for past, present, buffer, (heads, dim) in zip(self.past_names, self.present_names, self.kv, self.kv_dims):
            shape = [batch, heads, self.manifest.max_seq, dim]
            binding.bind_input(past, self.device, 0, self.kv_type, shape, buffer.data_ptr())
            binding.bind_output(present, self.device, 0, self.kv_type, shape, buffer.data_ptr())
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)

    def _decode_for(self, batch: int) -> _Decode:
        import onnxruntime as ort

        if batch not in self.decodes:
            zeros = {"input_ids": (batch, 1), "attention_mask": (batch, self.manifest.max_seq)}
            inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.int64), self.device, 0)
                      for name, shape in zeros.items()}
            outputs = {name: ort.OrtValue.ortvalue_from_shape_and_type((batch, *tail), dtype, self.device, 0)
                       for name, (dtype, tail) in self.heads.items()}
            binding = self.session.io_binding()
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            self._bind_cache_and_outputs(binding, batch, outputs)
            self.decodes[batch] = _Decode(binding, inputs, outputs, self._options(next(self.graph_ids)))
        return self.decodes[batch]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> _Decode:
        """One graph run; returns the batch size's record, whose outputs hold the results."""
        batch, new = input_ids.shape
        past = attention_mask.shape[1] - new
        lengths = attention_mask.sum(axis=1)
        decode = self._decode_for(batch)
        if past == 0:  # prefill: the real tokens of each row first, then padding
            if not lengths.all():
                raise RequestError("every row needs at least one prompt token")
            limit = self.manifest.max_run_tokens  # set where a layer fell back to a lowering that grows with T
            if limit is not None and batch * new > limit:
                raise RequestError(f"a prompt batch of {batch} x {new} tokens is past the {limit} tokens one run of this "
                                   "build may take; give fewer or shorter prompts, or use a portable build")
            filled = np.arange(new) < lengths[:, None]
            ids = np.full_like(input_ids, self.manifest.pad_token_id)
            ids[filled] = input_ids[attention_mask == 1]
            mask = filled.astype(np.int64)
            binding, options = self.session.io_binding(), self.uncaptured
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            self._bind_cache_and_outputs(binding, batch, decode.outputs)
        elif new == 1 and attention_mask[:, -1].all():
            decode.inputs["input_ids"].update_inplace(np.ascontiguousarray(input_ids))
            decode.inputs["attention_mask"].update_inplace((self.slots < lengths[:, None]).astype(np.int64))
            binding, options = decode.binding, decode.options if decode.runs >= self.WARMUP else self.uncaptured
            decode.runs += 1
        else:
            raise RequestError(f"backend '{self.name}' runs an ort-form build as a prompt into an empty cache, then one "
                               f"new token in every row per step; got {new} tokens after {past}")
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime's own exception types
            hint = "; retry with --no-cuda-graph (cuda_graph=False)" if self.cuda_graph and self.device == "cuda" else ""
            raise MoeCompileError(f"backend '{self.name}': ONNX Runtime failed a step of batch {batch}, {new} tokens after "
                                  f"{past}: {str(exc).splitlines()[0][:200]}{hint}") from None
        binding.synchronize_outputs()
        return decode

    def _read(self, decode: _Decode, name: str) -> np.ndarray:
        """One output of the last run, copied to the host: the only device-to-host copy of a step."""
        value = decode.outputs[name]
        out = np.empty(value.shape(), self.heads[name][0])
        return self.memory.copy_rows(out, value.data_ptr(), out.strides[0], len(out))

    def _step_last(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._read(self._run(input_ids, attention_mask), "logits")

    def _step_tokens(self, input_ids, attention_mask, position_ids, chooser: Chooser) -> np.ndarray:
        decode = self._run(input_ids, attention_mask)
        reads = chooser.reads(self.manifest.sampling_candidates)
        if reads == "argmax":
            return self._read(decode, "next_token")
        if reads == "top":
            return chooser.from_candidates(self._read(decode, "top_logits"), self._read(decode, "top_ids"))
        return chooser(self._read(decode, "logits"))

    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """Every position's logits [B, S, V]. The graph gives each row's last only, so S new tokens run as
        S one-token steps: exact, and S times slower (for parity checks such as `verify`)."""
        past = attention_mask.shape[1] - input_ids.shape[1]
        if not attention_mask[:, past:].all():
            raise RequestError(f"backend '{self.name}' gives every position's logits of an ort-form build only for "
                               "unpadded rows; use a portable build, or ask for the last position (step_last)")
        return np.stack([self._step_last(input_ids[:, j : j + 1], attention_mask[:, : past + j + 1], None)
                         for j in range(input_ids.shape[1])], axis=1)


class OrtCudaInplaceBackend(OrtInplaceBackend, OrtCudaBackend):
    name, form = "ort-cuda", "ort"

    def provider_options(self) -> dict:
        return {**super().provider_options(), **({"enable_cuda_graph": 1} if self.cuda_graph else {})}

    def _activate(self) -> None:
        if self.manifest.dtype == "fp32":
            raise MissingKernelError(
                "ONNX Runtime's CUDA GroupQueryAttention has no fp32 kernel: the attention of this fp32 ort-form build "
                "would run on the CPU, cut off from its in-place cache (wrong tokens, seen with 1.31.1 on the H200); "
                "build with --dtype fp16 or bf16, or run this build with --backend ort")
        try:
            super()._activate()
        except ArtifactError as exc:
            if not self.cuda_graph:
                raise
            raise ArtifactError(f"{exc} (CUDA graphs need every compute node on the CUDA provider: no If/Loop/Scan, no "
                                "host value feeding a CUDA node; run with --no-cuda-graph)") from None
