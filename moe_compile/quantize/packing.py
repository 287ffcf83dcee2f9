"""Weight-only quantization of one tensor: round-to-nearest, symmetric, per block along the input
feature (K) axis; the packed layouts ONNX Runtime's ops read, and a reference dequantizer for each.

Round-to-nearest with a positive scale per block, `scale = max|w| / (2^(bits−1) − 1)` rounded to
fp16, codes `q = round(w / scale)` in [−7, 7] (int4) or [−127, 127] (int8). onnxruntime's MatMulNBits
quantizer (`quantize_matmul_{4,8}bits`, symmetric) is not used: it picks signed scales (max|w| / −8,
one more level), and TensorRT's ONNX parser refuses a negative DequantizeLinear scale; one quantizer
serves both forms. What it produces for a weight with rows `[N, K]` (nn.Linear's layout):

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

import numpy as np

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32


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
        u = self.codes
        if self.bits == 4:
            u = np.stack([u & 0xF, u >> 4], axis=-1)
        return (u.reshape(*self.codes.shape[:-2], self.k).astype(np.int16) - (1 << (self.bits - 1))).astype(np.int8)

    def dequantize(self) -> np.ndarray:
        """The reference: `[..., N, K]` fp32, what every consumer of these codes computes."""
        q = self.unpacked().astype(np.float32).reshape(*self.codes.shape[:-1], self.block_size)
        return (q * self.scales.astype(np.float32)[..., None]).reshape(*self.codes.shape[:-2], self.k)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def quantize_rows(weight: np.ndarray, bits: int, block_size: int, dtype, scale_dtype=np.float16) -> Blockwise:
    """Quantize `weight [..., N, K]` (any float dtype) per block of `block_size` along K: one matrix at a
    time, so only one fp32 copy of a matrix exists beside the codes."""
    *lead, n, k = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    qmax = (1 << (bits - 1)) - 1
    flat = weight.reshape(-1, n, k)
    codes = np.empty((flat.shape[0], n, k // block_size, block_size * bits // 8), np.uint8)
    scales = np.empty((flat.shape[0], n, k // block_size), dtype)
    for i, matrix in enumerate(flat):
        blocks = matrix.astype(np.float32).reshape(n, k // block_size, block_size)
        scale = (np.abs(blocks).max(axis=-1) / qmax).astype(scale_dtype).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        q = np.clip(np.rint(blocks / safe[..., None]), -qmax, qmax).astype(np.int16) + (1 << (bits - 1))
        codes[i] = pack(q.astype(np.uint8), bits)
        scales[i] = scale
    return Blockwise(codes.reshape(*lead, *codes.shape[1:]), scales.reshape(*lead, *scales.shape[1:]), bits, block_size)


def pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., block] -> MatMulNBits' blob [..., block·bits/8] (int4: lower nibble first)."""
    return u if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def qmoe_weights(q: Blockwise) -> tuple[np.ndarray, np.ndarray]:
    """QMoE's (weights [E, N, K·bits/8], scales [E, N, K/block]) for experts quantized as [E, N, K]."""
    e, n = q.codes.shape[:2]
    return q.codes.reshape(e, n, -1), q.scales


def matmul_nbits_weights(q: Blockwise) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' (B [N, K/block, blob], scales [N, K/block]) for a weight quantized as [N, K]."""
    return q.codes, q.scales
