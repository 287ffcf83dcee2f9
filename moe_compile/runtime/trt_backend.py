"""TensorRT backend: binds shapes and device buffers to engine.plan and executes it; everything else
(prefill, decode, sampling, stop conditions, streaming) is the shared decode loop's.

The KV cache lives in preallocated device buffers of the maximum size (max_batch x max_seq) and never
goes to the host. The ONNX's cache is `present = concat(past, new)`, so each cache tensor has two
buffers: a step reads `past` from one and writes `present` into the other, and the next step swaps
them. Each buffer is used as one contiguous [batch, heads, length, dim] tensor of the current length.
Only the logits of the last position are copied to the host. The step picks the engine's profile
(prefill into an empty cache, decode one token per row). With tensorrt_rtx, `cuda_graphs` lets
TensorRT-RTX capture and replay each step shape as a CUDA graph (its whole-graph capture strategy).
"""

from __future__ import annotations

import numpy as np

from ..errors import MoeCompileError
from .backend import Backend


class TrtBackend(Backend):
    name = "trt"
    device = "cuda"
    # tensorrt_rtx only (full TensorRT would need a new graph for every cache length). Off by default:
    # not yet run on a GPU that TensorRT-RTX supports; set TrtBackend.cuda_graphs = True to opt in.
    cuda_graphs = False

    def _activate(self) -> None:
        import torch

        from ..models.loading import DTYPES
        from ..trt.engine import engine_from_plan

        self.trt, self.engine = engine_from_plan(self.out, self.manifest)
        self.profiles = self.manifest.engine["profiles"]
        config = self.trt.runtime_config(self.engine, self.cuda_graphs)
        self.context = self.engine.create_execution_context(config) if config else self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.torch = torch
        self.past_names, self.present_names = self.kv_names()
        # Two flat buffers per cache tensor, each of the largest size (see the module docstring).
        dtype, batch, length = DTYPES[self.manifest.dtype], self.manifest.max_batch, self.manifest.max_seq
        sizes = [batch * heads * length * dim for key, value in self.manifest.kv["layers"] for heads, dim in (key, value)]
        self.require_kv_memory(batch, copies=2)
        self.buffers = [[torch.empty(n, dtype=dtype, device="cuda") for n in sizes] for _ in range(2)]
        self.profile = -1

    def _reset(self, batch: int) -> None:
        self.source = 0  # which buffer set holds `past`; an empty cache needs no clearing

    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._run(input_ids, attention_mask, position_ids).cpu().numpy()

    def _step_last(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._run(input_ids, attention_mask, position_ids)[:, -1].cpu().numpy()

    def _run(self, input_ids, attention_mask, position_ids):
        from ..trt import profiles

        torch, context = self.torch, self.context
        batch, new = input_ids.shape
        past, present = self.buffers[self.source], self.buffers[1 - self.source]
        shapes = {"input_ids": input_ids.shape, "attention_mask": attention_mask.shape, "position_ids": position_ids.shape}
        kv = self.empty_kv_shapes(batch)
        shapes.update({n: (b, h, self.length, d) for n, (b, h, _, d) in zip(self.past_names, kv)})
        profile = profiles.pick(self.profiles, shapes)
        with torch.cuda.stream(self.stream):
            if profile != self.profile:
                context.set_optimization_profile_async(profile, self.stream.cuda_stream)
                self.profile = profile
            host = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            feeds = {n: torch.from_numpy(a).to("cuda", non_blocking=True) for n, a in host.items()}
            feeds.update({n: buffer for n, buffer in zip(self.past_names, past)})
            for name, tensor in feeds.items():
                context.set_input_shape(name, tuple(shapes[name]))
                context.set_tensor_address(name, tensor.data_ptr())
            logits = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
            context.set_tensor_address("logits", logits.data_ptr())
            for name, buffer in zip(self.present_names, present):
                context.set_tensor_address(name, buffer.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise MoeCompileError(f"{self.trt.describe()} failed to execute a step of batch {batch}, {new} tokens")
        self.stream.synchronize()  # the host feeds above and the logits' readback must not race the step
        self.source = 1 - self.source
        return logits
