// Block-quantized weight rows as the A operand of mma.sync m16n8k16, dequantized in registers: the building
// block of every kernel that reads int4/int8 codes (the MoE decode kernels, decode_mma.cu, and the dense
// quantized GEMV, quant_matmul.cu). Layout as fused_moe.h: codes u = q + 2^(bits-1), int4 two a byte (the lower
// nibble first), one scale per block of the input axis.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace moe {

// Rows of block-quantized weights as the A operand: the codes and scales of row element 0; + n moves n
// elements along the rows (n a multiple of the block: row starts, expert starts, the down kernel's slices).
// U: 16-byte loads of codes in flight per lane per row (the caller's k-range decides what fills it).
template <typename T, int BITS, int U>
struct QuantRows {
  static constexpr int kRoundK = 4 * (128 / BITS) * U;  // k of a warp's round of loads in mma_rows16
  const uint8_t* codes;
  const T* scales;
  int block;
  __device__ __forceinline__ QuantRows operator+(size_t n) const {
    return {codes + n * BITS / 8, scales + n / block, block};
  }
  __device__ __forceinline__ explicit operator bool() const { return codes != nullptr; }
};

__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

// (a & mask) | magic in one instruction (the compiler's own lowering takes two: both constants as immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

// Weights k 8c .. 8c+7 of a 16-byte load of codes as the 4 registers of mma pairs, times the block's scale.
// int8: pairs (k 2j, 2j+1), as a 16-bit load would give. int4: pairs (k j, j+4), which one mask picks out of a
// word of 8 nibbles (the tokens' pairs are permuted to match: mma_rows16), so that a pair costs a LOP3, not a
// byte permute and two LOP3s (a third of the instructions of an int4 fp16 decode step; the kernels are bound by
// issue, docs/FUSED_MOE.md). fp16: a code u under 0x6400 is the half 1024 + u exactly, so one subtraction gives
// u - 2^(bits-1) exactly and the product with the scale rounds once, as a dequantized fp16 weight does; an upper
// nibble lands as 1024 + 16 u, undone by x 1/16 in the same fused multiply-add. bf16 int4: 0x4300 | u is 128 + u
// exactly (7 mantissa bits hold u < 16, not 16 u: the upper nibbles are shifted down). bf16 int8 has no exact
// 16-bit trick: through fp32 (2^23 + u is exact there).
template <typename T, int BITS>
__device__ __forceinline__ void dequant8(const uint4& v, int c, T scale, uint32_t (&out)[4]) {
  if constexpr (std::is_same_v<T, __half> && BITS == 4) {
    const uint32_t q = (&v.x)[c], magic = 0x64006400u;
    const __half2 s2 = __half2half2(scale), zero = __float2half2_rn(1032.f), sixteenth = __float2half2_rn(1.f / 16),
                  upper_zero = __float2half2_rn(-72.f);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t lo = and_or(q >> (8 * j), 0x000F000Fu, magic), hi = and_or(q >> (8 * j), 0x00F000F0u, magic);
      out[2 * j] = as_u32(__hmul2(__hsub2(*reinterpret_cast<__half2*>(&lo), zero), s2));
      out[2 * j + 1] = as_u32(__hmul2(__hfma2(*reinterpret_cast<__half2*>(&hi), sixteenth, upper_zero), s2));
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16> && BITS == 4) {
    const uint32_t q = (&v.x)[c], magic = 0x43004300u;
    const __nv_bfloat162 s2 = __bfloat162bfloat162(scale), zero = __float2bfloat162_rn(136.f);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t h = and_or(q >> (4 * j), 0x000F000Fu, magic);
      const __nv_bfloat162 w = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&h), zero), s2);
      out[j] = *reinterpret_cast<const uint32_t*>(&w);
    }
  } else if constexpr (std::is_same_v<T, __half>) {
    const __half2 bias = __float2half2_rn(1152.f), s2 = __half2half2(scale);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int b = (j % 2) * 2;  // bytes b, b + 1 of word 2c + j / 2
      uint32_t h = __byte_perm((&v.x)[2 * c + j / 2], 0x64646464u, 0x4040 | ((b + 1) << 8) | b);
      out[j] = as_u32(__hmul2(__hsub2(*reinterpret_cast<__half2*>(&h), bias), s2));
    }
  } else {
    static_assert(BITS == 8, "int4 has its own branches");
    const float s = to_float(scale), zero = 8388608.f + 128.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t word = (&v.x)[2 * c + j / 2];
      const uint32_t lo = (word >> (16 * (j % 2))) & 0xFFu, hi = (word >> (16 * (j % 2) + 8)) & 0xFFu;
      out[j] = pack2<T>((__uint_as_float(0x4B000000u | lo) - zero) * s, (__uint_as_float(0x4B000000u | hi) - zero) * s);
    }
  }
}

// The tokens' 8 values at k 8c .. 8c+7 as the B registers of the two mma steps that dequant8's out feeds: x 2j, 2j+1
// (int8), or x j, j+4 (int4's pairs).
template <int BITS>
__device__ __forceinline__ void token_pairs(const uint4& x, uint32_t (&b0)[2], uint32_t (&b1)[2]) {
  if constexpr (BITS == 4) {
    b0[0] = __byte_perm(x.x, x.z, 0x5410), b0[1] = __byte_perm(x.x, x.z, 0x7632);
    b1[0] = __byte_perm(x.y, x.w, 0x5410), b1[1] = __byte_perm(x.y, x.w, 0x7632);
  } else {
    b0[0] = x.x, b0[1] = x.y, b1[0] = x.z, b1[1] = x.w;
  }
}

// mma_rows16 over quantized rows: lane (g, t) loads 16 bytes of codes of rows g and g+8 (C consecutive k,
// inside one block since the block is a multiple of C) and their scales, and the same k of its tokens.
// len % C == 0 (a multiple of the block size). Four accumulator chains, summed at the end: a 16-byte load
// feeds 2C/8 mma steps, and one chain of dependent mma.sync would make their latency the critical path.
// wait: the tokens are the launch before's output, read only after wait_for_producer, which waits once the
// first round's weights are in flight.
template <typename T, int NT, int BITS, int U>
__device__ __forceinline__ void mma_rows16(QuantRows<T, BITS, U> w_lo, QuantRows<T, BITS, U> w_hi,
                                           const T* const (&xs)[NT], int len, float (&acc)[NT][4], bool wait = false) {
  constexpr int C = 128 / BITS;  // k in one 16-byte load of codes
  const int t = threadIdx.x % 4;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int block_shift = __ffs(w_lo ? w_lo.block : w_hi.block) - 1;  // blocks are powers of two: no division
  float part[4][NT][4] = {};
  for (int base = 0; base < len; base += 4 * C * U) {  // uniform over the warp
    uint4 lo[U], hi[U];
    T s_lo[U], s_hi[U];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int k = base + (4 * q + t) * C;
      const bool ok = k < len;
      lo[q] = ok && w_lo ? __ldcs(reinterpret_cast<const uint4*>(w_lo.codes + k * BITS / 8)) : zero;
      hi[q] = ok && w_hi ? __ldcs(reinterpret_cast<const uint4*>(w_hi.codes + k * BITS / 8)) : zero;
      s_lo[q] = ok && w_lo ? w_lo.scales[k >> block_shift] : from_float<T>(0.f);  // zero: a row past the end
      s_hi[q] = ok && w_hi ? w_hi.scales[k >> block_shift] : from_float<T>(0.f);
    }
    if (wait && base == 0) wait_for_producer();
#pragma unroll
    for (int q = 0; q < U; ++q) {
      if (base + 4 * q * C >= len) break;
      const int k = base + (4 * q + t) * C;
      const bool ok = k < len;
#pragma unroll
      for (int c = 0; c < C / 8; ++c) {
        uint32_t a_lo[4], a_hi[4];
        dequant8<T, BITS>(lo[q], c, s_lo[q], a_lo);
        dequant8<T, BITS>(hi[q], c, s_hi[q], a_hi);
        const uint32_t a0[4] = {a_lo[0], a_hi[0], a_lo[1], a_hi[1]};
        const uint32_t a1[4] = {a_lo[2], a_hi[2], a_lo[3], a_hi[3]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xv = ok && xs[nt] ? *reinterpret_cast<const uint4*>(xs[nt] + k + 8 * c) : zero;
          uint32_t b0[2], b1[2];
          token_pairs<BITS>(xv, b0, b1);
          mma_16816<T>(part[2 * (c % 2)][nt], a0, b0);
          mma_16816<T>(part[2 * (c % 2) + 1][nt], a1, b1);
        }
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] += (part[0][nt][i] + part[1][nt][i]) + (part[2][nt][i] + part[3][nt][i]);
}

}  // namespace moe
