// Dense block-quantized matmul on tensor cores: y [M, N] = x [M, K] W^T (+ bias), W as com.microsoft:MatMulNBits
// holds it (fused_moe.h: moe_compile_quantized_matmul). A quantized build's attention projections and, with
// --quantize-lm-head, its LM head: ONNX Runtime's MatMulNBits took 10 us a layer on A2.7B's four projections
// (9.4 MB, 0.9 TB/s; docs/BENCHMARKS.md), plus a launch for the bias.
//
// The work split of the MoE decode kernels (decode_mma.cu) for one dense matrix: a warp takes 16 rows as the A
// operand of mma.sync (codes dequantized in registers, quant_rows.cuh) over a slice of K; KSPLIT warps share a
// row group and add their sums through shared memory in a fixed order; the tokens are the B operand, 8 an n-tile.
// grid.y walks the tokens 8 NT at a time, so a prefill reads each weight once per 16 tokens (from L2 where the
// matrix fits) instead of dequantizing it into a buffer. The launch starts as its predecessor's programmatic
// dependent (sm_90+): a warp's first round of weights is in flight before it waits for x, so the loads of a
// projection overlap the end of the launch before it (the attention's merge for the o projection).
#include "common.cuh"
#include "kernels.h"
#include "quant_rows.cuh"

namespace moe {

template <typename T, int NT, int BITS, int U, int KSPLIT, int WARPS>
__global__ void __launch_bounds__(WARPS* kWarp)
    quant_matmul_kernel(const T* __restrict__ x, int M, int K, int N, QuantRows<T, BITS, U> w,
                        const T* __restrict__ bias, T* __restrict__ y) {
  using W = QuantRows<T, BITS, U>;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int split = warp % KSPLIT;
  const int r0 = ((int)blockIdx.x * (WARPS / KSPLIT) + warp / KSPLIT) * 16;  // the warp's 16 rows
  const int m0 = (int)blockIdx.y * 8 * NT;                                  // its first token
  // slices of K in multiples of 128: they start on a block, and on a 16-byte load of codes
  const int per_split = (int)ceil_div(ceil_div(K, 128), KSPLIT) * 128, k0 = split * per_split;
  const int len = max(0, min(per_split, K - k0));
  allow_dependent_launch();  // our attention after q/k/v starts early too, and waits for this launch
  float acc[NT][4] = {};
  if (r0 < N && len > 0) {  // uniform over the warp: mma.sync needs all lanes
    const T* xs[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = m0 + g + 8 * nt;
      xs[nt] = m < M ? x + (size_t)m * K + k0 : nullptr;
    }
    const W lo = r0 + g < N ? w + ((size_t)(r0 + g) * K + k0) : W{};
    const W hi = r0 + g + 8 < N ? w + ((size_t)(r0 + g + 8) * K + k0) : W{};
    mma_rows16<T, NT>(lo, hi, xs, len, acc, true);
  }
  wait_for_producer();  // every block, those without rows too: this grid ends after the launch before
  if (!add_split_sums<NT, KSPLIT, WARPS>(acc)) return;
  if (r0 >= N) return;
  // acc[nt] = {row g, row g, row g + 8, row g + 8} x {token 2t, 2t + 1} of n-tile nt
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int m = m0 + 8 * nt + 2 * t + c;
      if (m >= M) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = r0 + g + 8 * half;
        if (r < N) y[(size_t)m * N + r] = from_float<T>(acc[nt][2 * half + c] + (bias ? to_float(bias[r]) : 0.f));
      }
    }
}

// Launch settings measured on the H200 (A2.7B's projections at K = 2048, T = 1, over copies of the weights L2 cannot
// hold; docs/FUSED_MOE.md): a projection's few rows (q/k/v 6144, o 2048) want every warp in flight at once, 8 warps
// on one row group, each an eighth of K in one round of 2 loads (int4 q/k/v 6.5 us, o 4.4); the LM head's 151936
// rows want whole waves of small blocks, 2 warps a row group, 2 row groups a block (71.7 us, 2.4 TB/s, where the
// first setting takes 95.6). NT: one n-tile up to 8 tokens, two beyond.
template <typename T, int BITS, int KSPLIT, int WARPS>
void launch_quant_matmul_split(const void* x, const void* codes, const void* scales, const void* bias, void* y, int M,
                               int K, int N, int block, cudaStream_t s) {
  constexpr int kRound = 2;
  const QuantRows<T, BITS, kRound> w{static_cast<const uint8_t*>(codes), static_cast<const T*>(scales), block};
  const T* b = static_cast<const T*>(bias);
  const dim3 grid((unsigned)ceil_div(N, 16 * (WARPS / KSPLIT)), (unsigned)ceil_div(M, M <= 8 ? 8 : 16));
  const T* xt = static_cast<const T*>(x);
  if (M <= 8)
    launch_programmatic(true, quant_matmul_kernel<T, 1, BITS, kRound, KSPLIT, WARPS>, grid, dim3(WARPS * kWarp), 0, s,
                        xt, M, K, N, w, b, static_cast<T*>(y));
  else
    launch_programmatic(true, quant_matmul_kernel<T, 2, BITS, kRound, KSPLIT, WARPS>, grid, dim3(WARPS * kWarp), 0, s,
                        xt, M, K, N, w, b, static_cast<T*>(y));
}

constexpr int kManyRows = 32768;  // rows from which the LM head's setting wins (between 6144 and 151936 measured)

template <typename T, int BITS>
void launch_quant_matmul_as(const void* x, const void* codes, const void* scales, const void* bias, void* y, int M,
                            int K, int N, int block, cudaStream_t s) {
  if (N >= kManyRows) launch_quant_matmul_split<T, BITS, 2, 4>(x, codes, scales, bias, y, M, K, N, block, s);
  else launch_quant_matmul_split<T, BITS, 8, 8>(x, codes, scales, bias, y, M, K, N, block, s);
}

template <typename T>
void launch_quant_matmul_bits(const void* x, const void* codes, const void* scales, const void* bias, void* y, int M,
                              int K, int N, int bits, int block, cudaStream_t s) {
  if (bits == 4) launch_quant_matmul_as<T, 4>(x, codes, scales, bias, y, M, K, N, block, s);
  else launch_quant_matmul_as<T, 8>(x, codes, scales, bias, y, M, K, N, block, s);
}

}  // namespace moe

extern "C" int moe_compile_quantized_matmul(const void* x, const void* codes, const void* scales, const void* bias,
                                            void* y, int64_t M, int64_t K, int64_t N, int32_t bits, int32_t block_size,
                                            int32_t dtype, void* cuda_stream) {
  const bool block_ok = block_size == 32 || block_size == 64 || block_size == 128;
  if (M < 0 || K <= 0 || N <= 0 || M > INT32_MAX / 16 || K > INT32_MAX / 16 || N > INT32_MAX / 16 ||
      (bits != 4 && bits != 8) || !block_ok || K % block_size)
    return MOE_ERR_INVALID_ARGUMENT;
  if (dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return MOE_ERR_INVALID_ARGUMENT;
  if (M == 0) return MOE_OK;
  // 16-byte loads of x rows and of codes
  if (!x || !codes || !scales || !y || reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(codes) % 16)
    return MOE_ERR_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  if (dtype == MOE_DTYPE_F16)
    moe::launch_quant_matmul_bits<__half>(x, codes, scales, bias, y, (int)M, (int)K, (int)N, bits, block_size, s);
  else
    moe::launch_quant_matmul_bits<__nv_bfloat16>(x, codes, scales, bias, y, (int)M, (int)K, (int)N, bits, block_size, s);
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
