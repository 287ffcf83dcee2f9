"""ONNX Runtime on builds of the ort form (manifest.form "ort"): `ort` and `ort-cuda` pick these variants.

GroupQueryAttention updates the KV cache in place and the graph ends in ArgMax and TopK, so a decode
step moves only token ids across the bus, and every address and shape of a decode step is fixed,
which lets ort-cuda replay it as a CUDA graph.

    reset(B)  one buffer per KV tensor, [capacity, kv_heads, max_seq, head_dim], allocated once (grown
              for a larger batch) and bound as both past_key_values.i and present.i: GQA writes in place
    prefill   the loop's left-padded rows -> right-padded [B, S] with mask [B, S]; bound afresh, uncaptured
    decode    input_ids [B, 1] and mask [B, max_seq] (row b: ones on the n_b slots it fills after this
              step) in fixed OrtValues, outputs in fixed OrtValues: one binding per batch size, built once
    host      next_token [B] (greedy), top_logits/top_ids [B, C] (top_k <= C), else the logits rows

ort-cuda with CUDA graphs (runtime/cuda_step.py): ONNX Runtime runs on a stream of ours; each batch size's
first WARMUP decode steps run uncaptured with the very shapes its graph will have (the arena holds their
memory before the capture), the next one is captured with the argmax's copy into input_ids, and from then
on every step is one launch of that graph. A greedy step also launches the step after it before it waits for
its own token ("ahead"): the GPU runs step t+1 while the host reads token t and the decode loop goes round.
The next call takes that step if it feeds the same ids and lengths; otherwise (sampling, a finished row's
padding, a new prompt) the new step runs over it, writing the same cache slots. ONNX Runtime's own capture
stays off (gpu_graph_id -1), but enable_cuda_graph stays on: with it the session refuses a graph in which a
host value feeds a CUDA node (a MemcpyFromHost, which a replay would not redo).

Seen on the H200 (onnxruntime-gpu 1.31.1): a tiny Qwen2-MoE fp16 ort-form build decodes in 0.27 ms a
step with ONNX Runtime's CUDA graphs and 1.38 ms without, the same tokens (greedy and sampled, batches 1
and 3). fp32 builds cannot run on ort-cuda (no fp32 CUDA GroupQueryAttention).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ArtifactError, MoeCompileError, RequestError
from .ort_backend import MissingKernelError, OrtBackend, OrtCudaBackend
from .sampling import Chooser

GRAPH_OPTION = "gpu_graph_id"  # ONNX Runtime run option: which of its CUDA graphs a run captures or replays; -1 = none
NO_SYNC_OPTION = "disable_synchronize_execution_providers"  # run option: no stream synchronisation at a run's end


@dataclasses.dataclass
class _Ahead:
    """A decode step launched before the caller asked for it: it feeds the argmax of the step before it."""

    slot: int  # its StepGraph slot
    lengths: np.ndarray  # each row's tokens after it
    ids: np.ndarray | None = None  # what it feeds: the step before it's tokens, once read


@dataclasses.dataclass
class _Decode:
    """One batch size's decode step: fixed inputs and outputs, bound once."""

    binding: object  # onnxruntime IOBinding
    inputs: dict  # input_ids [B, 1], attention_mask [B, max_seq]: OrtValues updated in place
    outputs: dict  # logits, next_token, top_logits, top_ids: OrtValues every step of this batch size writes
    runs: int = 0
    step: object = None  # ort-cuda with CUDA graphs: its cuda_step.StepGraph
    tokens: np.ndarray | None = None  # next_token of the last decode step the caller took (None: the prompt ran last)
    ahead: _Ahead | None = None


class OrtInplaceBackend(OrtBackend):
    form = "ort"

    def _activate(self) -> None:
        self._open_session()
        self.heads = {"logits": (np.float32, (self.manifest.vocab_size,)), "next_token": (np.int64, ()),
                      "top_logits": (np.float32, (self.manifest.sampling_candidates,)),
                      "top_ids": (np.int64, (self.manifest.sampling_candidates,))}
        self.slots = np.arange(self.manifest.max_seq)
        self.kv: list = []  # one OrtValue per KV tensor
        self.capacity = 0
        self.decodes: dict[int, _Decode] = {}
        self.run_options = self._run_options()

    def _run_options(self, **entries):
        """RunOptions for every ONNX Runtime run where the session has CUDA graphs on: its own capture off."""
        if not (self.cuda_graph and self.device == "cuda"):
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        for key, value in {GRAPH_OPTION: "-1", **entries}.items():
            options.add_run_config_entry(key, value)
        return options

    def _reset(self, batch: int) -> None:
        import onnxruntime as ort

        if batch > self.capacity:
            self.require_kv_memory(batch, copies=1, held_rows=self.capacity)
            self._drop_decodes()  # bindings into the old buffers go first, then the buffers
            self.kv = []
            for heads, dim in self.kv_dims:
                size = batch * heads * self.manifest.max_seq * dim
                buffer = ort.OrtValue.ortvalue_from_shape_and_type((size,), self.kv_type, self.device, 0)
                self.memory.zero(buffer.data_ptr(), size * self.kv_itemsize)  # GQA reads only filled slots; no NaN garbage
                self.kv.append(buffer)
            self.capacity = batch

    def _drop_decodes(self) -> None:
        self.decodes = {}

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
            self.decodes[batch] = _Decode(binding, inputs, outputs)
        return self.decodes[batch]

    def _session_run(self, binding, options) -> None:
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime's own exception types
            raise MoeCompileError(f"backend '{self.name}': ONNX Runtime failed a step: {str(exc).splitlines()[0][:200]}"
                                  f"{self._retry_hint()}") from None

    def _retry_hint(self) -> str:
        return "; retry with --no-cuda-graph (cuda_graph=False)" if self.cuda_graph and self.device == "cuda" else ""

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, ahead: bool = False) -> _Decode:
        """One step; returns the batch size's record, whose outputs hold the results. `ahead`: the caller takes
        the argmax (backends that can launch the next step early do: OrtCudaInplaceBackend)."""
        batch, new = input_ids.shape
        past = attention_mask.shape[1] - new
        lengths = attention_mask.sum(axis=1)
        decode = self._decode_for(batch)
        if past == 0:
            self._prefill(decode, input_ids, attention_mask, lengths)
        elif new == 1 and attention_mask[:, -1].all():
            self._decode(decode, input_ids, lengths, ahead)
        else:
            raise RequestError(f"backend '{self.name}' runs an ort-form build as a prompt into an empty cache, then one "
                               f"new token in every row per step; got {new} tokens after {past}")
        return decode

    def _prefill(self, decode: _Decode, input_ids, attention_mask, lengths) -> None:
        """The prompt: the real tokens of each row first, then padding; bound afresh, run uncaptured."""
        batch, new = input_ids.shape
        if not lengths.all():
            raise RequestError("every row needs at least one prompt token")
        limit = self.manifest.max_run_tokens  # set where a layer fell back to a lowering that grows with T
        if limit is not None and batch * new > limit:
            raise RequestError(f"a prompt batch of {batch} x {new} tokens is past the {limit} tokens one run of this "
                               "build may take; give fewer or shorter prompts, or use a portable build")
        filled = np.arange(new) < lengths[:, None]
        ids = np.full_like(input_ids, self.manifest.pad_token_id)
        ids[filled] = input_ids[attention_mask == 1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", filled.astype(np.int64))
        self._bind_cache_and_outputs(binding, batch, decode.outputs)
        self._session_run(binding, self.run_options)
        binding.synchronize_outputs()

    def _decode(self, decode: _Decode, input_ids, lengths, ahead: bool) -> None:
        decode.inputs["input_ids"].update_inplace(np.ascontiguousarray(input_ids))
        decode.inputs["attention_mask"].update_inplace((self.slots < lengths[:, None]).astype(np.int64))
        self._session_run(decode.binding, self.run_options)
        decode.binding.synchronize_outputs()

    def _read(self, decode: _Decode, name: str) -> np.ndarray:
        """One output of the last run, copied to the host: the only device-to-host copy of a step."""
        value = decode.outputs[name]
        out = np.empty(value.shape(), self.heads[name][0])
        return self.memory.copy_rows(out, value.data_ptr(), out.strides[0], len(out))

    def _tokens(self, decode: _Decode) -> np.ndarray:
        """The last step's next_token [B] on the host."""
        return self._read(decode, "next_token")

    def _step_last(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._read(self._run(input_ids, attention_mask), "logits")

    def _step_tokens(self, input_ids, attention_mask, position_ids, chooser: Chooser) -> np.ndarray:
        reads = chooser.reads(self.manifest.sampling_candidates)
        decode = self._run(input_ids, attention_mask, ahead=reads == "argmax")
        if reads == "argmax":
            return self._tokens(decode)
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
    WARMUP = 2  # uncaptured decode steps of a batch size before its capture

    def provider_options(self) -> dict:
        options = super().provider_options()
        if self.cuda_graph:
            options["enable_cuda_graph"] = 1
            if getattr(self, "stream", None) is not None:
                options["user_compute_stream"] = str(self.stream.value)
        return options

    def _activate(self) -> None:
        if self.manifest.dtype == "fp32":
            raise MissingKernelError(
                "ONNX Runtime's CUDA GroupQueryAttention has no fp32 kernel: the attention of this fp32 ort-form build "
                "would run on the CPU, cut off from its in-place cache (wrong tokens, seen with 1.31.1 on the H200); "
                "build with --dtype fp16 or bf16, or run this build with --backend ort")
        if self.cuda_graph:
            from .cuda_step import Cuda

            self.cuda = Cuda()
            self.stream = self.cuda.new_stream()  # before the session: its provider computes on this stream
        try:
            super()._activate()
        except ArtifactError as exc:
            if not self.cuda_graph:
                raise
            raise ArtifactError(f"{exc} (CUDA graphs need every compute node on the CUDA provider: no If/Loop/Scan, no "
                                "host value feeding a CUDA node; run with --no-cuda-graph)") from None
        self.capture_options = self._run_options(**{NO_SYNC_OPTION: "1"})

    def _settle(self) -> None:
        """Wait for a step launched ahead that no one took: nothing else may run beside a launched graph."""
        if any(decode.ahead is not None for decode in self.decodes.values()):
            self.cuda("cudaStreamSynchronize", self.stream)
            for decode in self.decodes.values():
                decode.ahead = None

    def _drop_decodes(self) -> None:
        self._settle()
        for decode in self.decodes.values():
            if decode.step is not None:
                decode.step.close()
        super()._drop_decodes()

    def _prefill(self, decode: _Decode, input_ids, attention_mask, lengths) -> None:
        self._settle()
        decode.tokens = None
        super()._prefill(decode, input_ids, attention_mask, lengths)

    def _decode(self, decode: _Decode, input_ids, lengths, ahead: bool) -> None:
        if not self.cuda_graph:
            return super()._decode(decode, input_ids, lengths, ahead)
        step = decode.step = decode.step or self._step_graph(decode, len(lengths))
        ids, taken, decode.ahead = input_ids[:, 0], decode.ahead, None
        if taken is not None and np.array_equal(taken.lengths, lengths) and np.array_equal(taken.ids, ids):
            slot = taken.slot
        elif decode.runs < self.WARMUP:
            slot = step.launch(ids, lengths, run=lambda: self._session_run(decode.binding, self.run_options))
        else:
            if not step.captured:
                self._capture(decode)
            slot = step.launch(ids, lengths)
        decode.runs += 1
        if ahead and step.captured and lengths.max() < self.manifest.max_seq:  # room for one more token in every row
            decode.ahead = _Ahead(step.launch(None, lengths + 1), lengths + 1)
        decode.tokens = step.tokens(slot)  # the step is done: its outputs are there to read
        if decode.ahead is not None:
            decode.ahead.ids = decode.tokens

    def _step_graph(self, decode: _Decode, batch: int):
        from .cuda_step import StepGraph

        return StepGraph(self.cuda, self.stream, batch, self.manifest.max_seq, decode.inputs["input_ids"].data_ptr(),
                         decode.inputs["attention_mask"].data_ptr(), decode.outputs["next_token"].data_ptr())

    def _capture(self, decode: _Decode) -> None:
        try:
            decode.step.capture(lambda: self.session.run_with_iobinding(decode.binding, self.capture_options))
        except Exception as exc:  # onnxruntime's exception types, or a CUDA error of the capture
            raise MoeCompileError(f"backend '{self.name}': capturing the decode step as a CUDA graph failed: "
                                  f"{str(exc).splitlines()[0][:200]}{self._retry_hint()}") from None

    def _tokens(self, decode: _Decode) -> np.ndarray:
        return super()._tokens(decode) if decode.tokens is None else decode.tokens
