"""ort-cuda's decode step as a CUDA graph of our own, launched ahead of the host (runtime/ort_inplace.py).

ONNX Runtime's CUDA-graph replay synchronises its stream inside every run, so all the host's work between two
steps (ONNX Runtime's run, the two input copies, the token's copy, the decode loop) left the GPU idle: ~190-240
µs of a 1.4 ms int4 step on the H200 (docs/BENCHMARKS.md, twenty-first run). Here ONNX Runtime computes on a
stream we own (the CUDA provider's user_compute_stream). One run of a batch size's decode binding is captured
on it (cudaStreamBeginCapture .. EndCapture; ONNX Runtime's own capture is skipped with gpu_graph_id -1 and its
end-of-run synchronisation with disable_synchronize_execution_providers), followed by a device copy of
next_token into input_ids. A launch then needs from the host only what it does not know on the device: the ids
when they are not the last step's argmax, and the mask's new element of each row.

    launch(ids or None, lengths):  [ids H2D] [mask H2D: one element a row] graph(ORT run; next_token -> input_ids)
                                   [next_token D2H into the slot's pinned buffer] event
    tokens(slot):                  wait for the slot's event; its pinned tokens

Two slots of pinned staging alternate, so the host can launch step t+1 before it reads step t's token: a slot is
written only after its previous launch's event has fired.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..errors import MoeCompileError
from .memory import _cudart

_HOST_TO_DEVICE, _DEVICE_TO_HOST, _DEVICE_TO_DEVICE = 1, 2, 3
_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit order with the legacy default stream
_CAPTURE_GLOBAL = 0  # cudaStreamCaptureModeGlobal, as ONNX Runtime's own capture
_DISABLE_TIMING = 2  # cudaEventDisableTiming: the cheapest event to record and wait on


class CudaError(MoeCompileError):
    """A CUDA runtime call of the decode step failed."""


class Cuda:
    """The CUDA runtime calls of a decode step (libcudart through ctypes: handles are void pointers)."""

    def __init__(self):
        self.lib = _cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def __call__(self, name: str, *args) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            text = self.lib.cudaGetErrorString(code).decode(errors="replace")
            raise CudaError(f"ort-cuda: {name} failed: {text} (CUDA error {code})")

    def handle(self, name: str, *args) -> ctypes.c_void_p:
        """Call a creator whose first argument is the handle it writes."""
        out = ctypes.c_void_p()
        self(name, ctypes.byref(out), *args)
        return out

    def new_stream(self) -> ctypes.c_void_p:
        return self.handle("cudaStreamCreateWithFlags", ctypes.c_uint(_NON_BLOCKING))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream) -> None:
        self("cudaMemcpyAsync", ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), ctypes.c_int(kind),
             stream)


class StepGraph:
    """One batch size's decode step on `stream`: the captured graph, two slots of pinned staging and their events.
    `input_ids` [B, 1] int64, `mask` [B, max_seq] int64 and `next_token` [B] int64 are the binding's device buffers."""

    def __init__(self, cuda: Cuda, stream, rows: int, max_seq: int, input_ids: int, mask: int, next_token: int):
        self.cuda, self.stream, self.rows, self.max_seq = cuda, stream, rows, max_seq
        self.input_ids, self.mask, self.next_token = input_ids, mask, next_token
        # per slot: ids [B], tokens [B], mask [B, max_seq]; then one constant 1 for the mask's new elements
        slot_words = rows * (2 + max_seq)
        words = 2 * slot_words + 1
        self.pinned_ptr = cuda.handle("cudaHostAlloc", ctypes.c_size_t(8 * words), ctypes.c_uint(0))
        self.pinned = np.ctypeslib.as_array(ctypes.cast(self.pinned_ptr, ctypes.POINTER(ctypes.c_int64)), (words,))
        self.pinned[-1] = 1
        self.staging = [{"ids": self.pinned[base : base + rows], "tokens": self.pinned[base + rows : base + 2 * rows],
                         "mask": self.pinned[base + 2 * rows : base + slot_words]}
                        for base in (0, slot_words)]  # a slot's views of the pinned words
        self.events = [cuda.handle("cudaEventCreateWithFlags", ctypes.c_uint(_DISABLE_TIMING)) for _ in range(2)]
        for event in self.events:
            cuda("cudaEventRecord", event, stream)
        self.slot = 0  # the slot the next launch uses
        self.mask_lengths: np.ndarray | None = None  # each row's ones in the device mask, where known
        self.graph = self.exec = None

    @property
    def captured(self) -> bool:
        return self.exec is not None

    def capture(self, run) -> None:
        """Record `run()` (one ONNX Runtime run of the decode binding, not synchronised) and the argmax's copy into
        input_ids as this batch size's graph. Nothing runs on the GPU: the caller launches the step after."""
        cuda, stream = self.cuda, self.stream
        cuda("cudaStreamSynchronize", stream)
        cuda("cudaStreamBeginCapture", stream, ctypes.c_int(_CAPTURE_GLOBAL))
        try:
            run()
            cuda.copy(self.input_ids, self.next_token, 8 * self.rows, _DEVICE_TO_DEVICE, stream)
        finally:
            graph = ctypes.c_void_p()
            ended = cuda.lib.cudaStreamEndCapture(stream, ctypes.byref(graph))  # always leave capture mode
        if ended != 0:
            text = cuda.lib.cudaGetErrorString(ended).decode(errors="replace")
            raise CudaError(f"ort-cuda: capturing the decode step failed: {text} (CUDA error {ended})")
        nodes = ctypes.c_size_t()
        cuda("cudaGraphGetNodes", graph, None, ctypes.byref(nodes))
        if nodes.value <= 1:  # our copy alone: ONNX Runtime computed on a stream of its own, which a replay would skip
            cuda("cudaGraphDestroy", graph)
            raise CudaError("ort-cuda: the captured decode step holds none of ONNX Runtime's kernels (its CUDA provider "
                            "did not compute on the user_compute_stream given to it)")
        self.graph = graph
        self.exec = cuda.handle("cudaGraphInstantiateWithFlags", graph, ctypes.c_ulonglong(0))

    def launch(self, ids: np.ndarray | None, lengths: np.ndarray, run=None) -> int:
        """Enqueue one step: `ids` [B] (None: the device's input_ids, the last launched step's argmax), each row's
        tokens after the step `lengths` [B]; `run` (uncaptured steps) runs ONNX Runtime in place of the graph.
        Returns the slot whose tokens() holds the step's next_token."""
        cuda, stream, slot = self.cuda, self.stream, self.slot
        self.slot ^= 1
        cuda("cudaEventSynchronize", self.events[slot])  # the slot's last launch has read its staging
        if ids is not None:
            staged = self.staging[slot]["ids"]
            staged[:] = ids
            cuda.copy(self.input_ids, staged.ctypes.data, 8 * self.rows, _HOST_TO_DEVICE, stream)
        self._update_mask(slot, lengths)
        if run is not None:
            run()
        else:
            cuda("cudaGraphLaunch", self.exec, stream)
        tokens = self.staging[slot]["tokens"]
        cuda.copy(tokens.ctypes.data, self.next_token, 8 * self.rows, _DEVICE_TO_HOST, stream)
        cuda("cudaEventRecord", self.events[slot], stream)
        return slot

    def _update_mask(self, slot: int, lengths: np.ndarray) -> None:
        """Row b's mask: ones on its first lengths[b] slots, whatever ran before (the mask holds nothing else).
        One more token a row (a decode step) is one element a row; anything else the whole mask."""
        known = self.mask_lengths
        if known is not None and np.array_equal(lengths, known):
            return
        if known is not None and np.array_equal(lengths, known + 1):
            for row, filled in enumerate(known.tolist()):
                self.cuda.copy(self.mask + 8 * (row * self.max_seq + filled), self.pinned[-1:].ctypes.data, 8,
                               _HOST_TO_DEVICE, self.stream)
        else:
            staged = self.staging[slot]["mask"]
            staged[:] = (np.arange(self.max_seq) < lengths[:, None]).reshape(-1)
            self.cuda.copy(self.mask, staged.ctypes.data, staged.nbytes, _HOST_TO_DEVICE, self.stream)
        self.mask_lengths = lengths.copy()

    def tokens(self, slot: int) -> np.ndarray:
        """The next_token [B] of the step launched in `slot`, once it is on the host."""
        self.cuda("cudaEventSynchronize", self.events[slot])
        return self.staging[slot]["tokens"].copy()

    def close(self) -> None:
        cuda = self.cuda
        cuda("cudaStreamSynchronize", self.stream)
        if self.exec is not None:
            cuda("cudaGraphExecDestroy", self.exec)
            cuda("cudaGraphDestroy", self.graph)
            self.graph = self.exec = None
        for event in self.events:
            cuda("cudaEventDestroy", event)
        self.events = []
        cuda("cudaFreeHost", self.pinned_ptr)
