"""Raw copies out of ONNX Runtime buffers, one interface for host and CUDA memory.

The ONNX Runtime backend keeps its outputs where the provider computed them and copies to the
host only the rows the decode loop reads (the last position's logits). On the CPU that copy is a
`memmove`; on CUDA it is one `cudaMemcpy2D` through the CUDA runtime that onnxruntime-gpu has
already loaded (import torch or put the CUDA 13 runtime on the library path first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

import numpy as np

from ..errors import MoeCompileError
from ..models.config_check import available_memory

_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost


class HostMemory:
    device = "cpu"

    def copy_rows(self, dst: np.ndarray, src_ptr: int, src_pitch: int, rows: int) -> np.ndarray:
        """Copy `rows` rows of dst.strides[0] bytes from src_ptr, one every src_pitch bytes, into dst."""
        width = dst.strides[0]
        base = dst.ctypes.data
        if src_pitch == width:
            ctypes.memmove(base, src_ptr, width * rows)
        else:
            for row in range(rows):
                ctypes.memmove(base + row * width, src_ptr + row * src_pitch, width)
        return dst

    def zero(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    def used_bytes(self) -> int | None:
        return None

    def free_bytes(self) -> int | None:
        """Bytes a new allocation can take without swapping (MemAvailable), None where unknown."""
        return available_memory()

    def name(self) -> str:
        return "cpu"


class CudaMemory(HostMemory):
    device = "cuda"

    def __init__(self):
        self.lib = _cudart()

    def copy_rows(self, dst: np.ndarray, src_ptr: int, src_pitch: int, rows: int) -> np.ndarray:
        width = dst.strides[0]
        code = self.lib.cudaMemcpy2D(
            ctypes.c_void_p(dst.ctypes.data), ctypes.c_size_t(width), ctypes.c_void_p(src_ptr),
            ctypes.c_size_t(src_pitch), ctypes.c_size_t(width), ctypes.c_size_t(rows), ctypes.c_int(_DEVICE_TO_HOST),
        )
        _check(code, "cudaMemcpy2D")
        return dst

    def zero(self, ptr: int, nbytes: int) -> None:
        _check(self.lib.cudaMemset(ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes)), "cudaMemset")
        # The legacy stream does not order ONNX Runtime's own (non-blocking) stream: finish before a run starts.
        _check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def used_bytes(self) -> int:
        """Device memory in use on the current device, by every process (cudaMemGetInfo)."""
        free, total = self._info()
        return total - free

    def free_bytes(self) -> int:
        """Device memory free on the current device (cudaMemGetInfo)."""
        return self._info()[0]

    def _info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    def name(self) -> str:
        props = ctypes.create_string_buffer(16384)  # cudaDeviceProp starts with char name[256]
        for symbol in ("cudaGetDeviceProperties", "cudaGetDeviceProperties_v2"):
            function = getattr(self.lib, symbol, None)
            if function is not None and function(props, 0) == 0:
                return props.raw[:256].split(b"\0")[0].decode(errors="replace")
        return "cuda"


def memory_for(device: str) -> HostMemory:
    return CudaMemory() if device == "cuda" else HostMemory()


def free_bytes(device: str) -> int | None:
    """Bytes a new allocation on `device` ('cpu' or 'cuda') can take now; None where this cannot be known."""
    try:
        return memory_for(device).free_bytes()
    except MoeCompileError:  # no CUDA runtime to ask: the allocation itself will tell
        return None


def _cudart():
    # The soname matches the runtime onnxruntime-gpu's CUDA provider already loaded into this process.
    wheels = [str(f) for root in map(Path, sys.path) if (root / "nvidia").is_dir()
              for f in sorted((root / "nvidia").glob("**/libcudart.so.1[23]"))]
    for name in ("libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart"), *wheels):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise MoeCompileError("ort-cuda: cannot load the CUDA runtime (libcudart); import torch first or add its lib dir to LD_LIBRARY_PATH")


def _check(code: int, call: str) -> None:
    if code != 0:
        raise MoeCompileError(f"ort-cuda: {call} failed with CUDA error {code}")
