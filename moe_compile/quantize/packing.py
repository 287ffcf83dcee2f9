"""Weight-only quantization of one tensor: round-to-nearest, symmetric, per block along the input
feature (K) axis; the packed layouts ONNX Runtime's ops read, and a reference dequantizer for each.

Round-to-nearest with a positive scale per block, `scale = max|w| / (2^(bits−1) − 1)` rounded to
fp16, codes `q = round(w / scale)` in [−7, 7] (int4) or [−127, 127] (int8). `scales="mse"` searches each
block's scale instead: `max|w| · r / (2^(bits−1) − 1)` for r in CLIP_RATIOS, the one whose codes (clamped)
rebuild the block with the least squared error; its largest code is still ±qmax, so quantizing the
dequantized block again with the default scale gives the same scale and codes (what the build relies on).

onnxruntime's MatMulNBits quantizer (`quantize_matmul_{4,8}bits`, symmetric) is not used: it picks signed
scales (max|w| / −8, one more level), and TensorRT's ONNX parser refuses a negative DequantizeLinear scale;
one quantizer serves both forms. What it produces for a weight with rows `[N, K]` (nn.Linear's layout):

    packed [N, K/block, block·bits/8] uint8   u = q + 2^(bits−1); int4: two codes a byte, the lower nibble first
    scales [N, K/block]                      u dequantizes as (u − 2^(bits−1)) · scale

- `com.microsoft:MatMulNBits` reads exactly that (B, scales; no zero points: the default 2^(bits−1)).
- `com.microsoft:QMoE` (weights_prepacked=0) reads per expert the same codes as `[E, N, K·bits/8]`
  ("raw [E,N,K/pack] tensors as produced by quantize_matmul_{4,8}bits") and scales `[E, N, K/block]`,
  for fc1 (gate/up rows interleaved, [E, 2I, H]) and fc2 ([E, H, I]), the rows as nn.Linear holds them.
- `DequantizeLinear` (opset 21, portable form) reads signed codes `int4`/`int8` `q = u − 2^(bits−1)`,
  unpacked, in the weight's own layout, with `block_size` on the K axis.

Scales are rounded to `scale_dtype` (fp16 by default) and stored in the build's dtype, because every op
here takes its scales in the activation type.
"""

from __future__ import annotations

import dataclasses
import warnings

import ml_dtypes
import numpy as np
import torch

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
ROUND = 12582912.0  # 1.5·2^23: x + ROUND − ROUND rounds an fp32 |x| < 2^22 to the nearest integer, ties to even
SCALES = ("absmax", "mse")
# the scale search's candidates, as fractions of max|w|: 1 first, so that it wins ties (docs/QUANTIZATION.md)
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(21))


@dataclasses.dataclass
class Blockwise:
    """One weight `[..., N, K]` (rows as nn.Linear holds them) quantized per block of K."""

    codes: np.ndarray  # uint8 [..., N, K/block, block·bits/8]: onnxruntime's MatMulNBits blob
    scales: np.ndarray  # [..., N, K/block], the build's dtype
    bits: int
    block_size: int

    @property
    def k(self) -> int:
        return self.codes.shape[-2] * self.block_size

    def unpacked(self) -> np.ndarray:
        """Signed codes `[..., N, K]` int8 (u − 2^(bits−1)): DequantizeLinear's int4/int8 values."""
        u = _unsigned(_torch(self.codes), self.bits).to(torch.int16) - (1 << (self.bits - 1))
        return u.to(torch.int8).reshape(*self.codes.shape[:-2], self.k).numpy()

    def dequantize(self) -> np.ndarray:
        """The reference: `[..., N, K]` fp32, what every consumer of these codes computes."""
        q = _unsigned(_torch(self.codes), self.bits).float().sub_(1 << (self.bits - 1))
        return q.mul_(_torch(self.scales).float()[..., None]).reshape(*self.codes.shape[:-2], self.k).numpy()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def quantize_rows(weight: np.ndarray, bits: int, block_size: int, dtype, scale_dtype=np.float16,
                  scales: str = "absmax", stored: torch.dtype = torch.float32) -> Blockwise:
    """Quantize `weight [..., N, K]` (any float dtype) per block of `block_size` along K, SLAB_ELEMENTS at a
    time (only that many fp32 values exist beside the codes: the LM head, 311 M weights at A2.7B's 151936 x
    2048, no longer passes through fp32 whole), in torch: its elementwise kernels use every core, which is what
    a 14B-parameter build waits on (numpy's took ~5 minutes of it). `scales`: "absmax" or "mse" (above);
    `stored`: the dtype the dequantized weight is kept in before it is quantized again (the build's)."""
    *lead, n, k = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    qmax = (1 << (bits - 1)) - 1
    flat = _torch(weight).reshape(-1, n, k)
    codes = torch.empty((flat.shape[0], n, k // block_size, block_size * bits // 8), dtype=torch.uint8)
    block_scales = torch.empty((flat.shape[0], n, k // block_size), dtype=torch.float32)
    for i, r0, rows in row_slabs(flat):
        blocks = rows.float().reshape(len(rows), k // block_size, block_size)
        largest = blocks.abs().amax(dim=-1)
        if scales == "mse":
            scale = _least_squares_scale(blocks, largest, qmax, _torch_dtype(scale_dtype), stored)
        else:
            scale = (largest / qmax).to(_torch_dtype(scale_dtype)).float()
        q = _codes(blocks, scale, qmax).add_(1 << (bits - 1))
        codes[i, r0:r0 + len(rows)] = pack(q.to(torch.uint8), bits)
        block_scales[i, r0:r0 + len(rows)] = scale
    block_scales = _numpy(block_scales, dtype)
    return Blockwise(codes.reshape(*lead, *codes.shape[1:]).numpy(), block_scales.reshape(*lead, *block_scales.shape[1:]),
                     bits, block_size)


def _codes(blocks: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(blocks / scale) clamped to ±qmax, as fp32, by adding and taking away 1.5·2^23 (round half to even,
    exact for |x| ≤ qmax; torch.round is 2x slower)."""
    safe = torch.where(scale == 0, 1.0, scale)
    return torch.div(blocks, safe[..., None]).clamp_(-qmax, qmax).add_(ROUND).sub_(ROUND)


def _least_squares_scale(blocks: torch.Tensor, largest: torch.Tensor, qmax: int, scale_dtype: torch.dtype,
                         stored: torch.dtype) -> torch.Tensor:
    """Per block, the candidate scale (rounded to scale_dtype) whose codes rebuild it with the least squared error;
    the first candidate (max|w| / qmax) wins ties. A candidate counts only where the default scale of the block
    it rebuilds, stored as `stored` (±qmax · scale rounded to it), is that scale again: an fp16 build keeps
    ~8% of int4 blocks' best scales from surviving otherwise."""
    best = best_error = None
    for ratio in CLIP_RATIOS:
        scale = (largest * ratio / qmax).to(scale_dtype).float()
        error = _codes(blocks, scale, qmax).mul_(scale[..., None]).sub_(blocks).square_().sum(dim=-1)
        if best is None:
            best, best_error = scale, error
            continue
        survives = ((scale * qmax).to(stored).float() / qmax).to(scale_dtype).float() == scale
        better = survives & (error < best_error)
        best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best


SLAB_ELEMENTS = 1 << 24  # weights quantized at once: 64 MB in fp32, whole rows (blocks run along a row)


def row_slabs(matrices: torch.Tensor):
    """(matrix index, first row, rows) of `matrices [M, N, K]` in slabs of whole rows, about SLAB_ELEMENTS each:
    views, so that a caller may also write back into them."""
    m, n, k = matrices.shape
    step = max(1, SLAB_ELEMENTS // k)
    for i in range(m):
        for r0 in range(0, n, step):
            yield i, r0, matrices[i, r0:r0 + step]


def pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., block] -> MatMulNBits' blob [..., block·bits/8] (int4: lower nibble first)."""
    return u if bits == 8 else u[..., 0::2] | (u[..., 1::2] << 4)


def _unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The blob [..., block·bits/8] -> unsigned codes u [..., block] uint8."""
    return codes if bits == 8 else torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)


def _torch_dtype(dtype) -> torch.dtype:
    dtype = np.dtype(dtype)
    return torch.bfloat16 if dtype == ml_dtypes.bfloat16 else torch.from_numpy(np.empty(0, dtype)).dtype


def _torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor without a copy (bfloat16: ml_dtypes' arrays, which torch cannot take, by view).
    Only read: an initializer's read-only array is fine (torch's warning about it is silenced)."""
    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def _numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    """`tensor` converted to numpy `dtype` (bfloat16 as ml_dtypes' type)."""
    if np.dtype(dtype) == ml_dtypes.bfloat16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.to(_torch_dtype(dtype)).numpy()


def qmoe_weights(q: Blockwise) -> tuple[np.ndarray, np.ndarray]:
    """QMoE's (weights [E, N, K·bits/8], scales [E, N, K/block]) for experts quantized as [E, N, K]."""
    e, n = q.codes.shape[:2]
    return q.codes.reshape(e, n, -1), q.scales


def matmul_nbits_weights(q: Blockwise) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' (B [N, K/block, blob], scales [N, K/block]) for a weight quantized as [N, K]."""
    return q.codes, q.scales
