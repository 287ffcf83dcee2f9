// Skip + RMS norm of a few rows by one block, rounded as com.microsoft:SkipSimplifiedLayerNormalization's CUDA kernel
// (norm.cu says how): the launch of its own (norm.cu) and the quantized matmul that normalises its own input
// (quant_matmul.cu), so that a decode step's pre-attention norm costs no launch. With the same block size the two
// give the same bits: each thread takes the same 16-byte pieces of a row, and the block adds in the same order.
#pragma once
#include "common.cuh"

namespace moe {

constexpr int kNormMaxThreads = 1024;

// The block's sum in a fixed order (each warp's, then the warps' in turn, by every thread alike): the same bits every
// run, and every thread holds it; the block may call it again at once.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kNormMaxThreads / kWarp];
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)blockDim.x / kWarp; ++w) total += warp_sums[w];
  __syncthreads();  // every thread has read warp_sums before the next call writes it
  return total;
}

// The skip sum of a 16-byte piece, each addition rounded to T (input + bias first, then + skip), and its squares
// scaled by 1/H into mean_square, in element order.
template <typename T>
__device__ __forceinline__ Vec<T> skip_sum(const Vec<T>& x, const Vec<T>* bias, const Vec<T>& skip, float rld,
                                           float& mean_square) {
  Vec<T> s;
#pragma unroll
  for (int i = 0; i < Vec<T>::kElems; ++i) {
    // a float sum of two 16-bit values rounded to 16 bits is the 16-bit addition's result (24 >= 2 * 11 + 2 bits)
    float v = x.get(i);
    if (bias) v = to_float(from_float<T>(v + bias->get(i)));
    const T rounded = from_float<T>(v + skip.get(i));
    reinterpret_cast<T*>(&s.raw)[i] = rounded;
    v = to_float(rounded);
    mean_square += rld * v * v;
  }
  return s;
}

// (gamma * sum) * rsigma in float32, rounded once.
template <typename T>
__device__ __forceinline__ Vec<T> scaled(const Vec<T>& gamma, const Vec<T>& sum, float rsigma) {
  Vec<T> o;
#pragma unroll
  for (int i = 0; i < Vec<T>::kElems; ++i)
    reinterpret_cast<T*>(&o.raw)[i] = from_float<T>(gamma.get(i) * sum.get(i) * rsigma);
  return o;
}

// Rows [rows, H] of input + skip, normalised into dst (shared memory here: the caller's matmul reads it after a
// __syncthreads), their sums into sum_out where not null. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void skip_norm_rows(const T* __restrict__ input, const T* __restrict__ skip,
                                               const T* __restrict__ gamma, int rows, int H, float epsilon, T* dst,
                                               T* __restrict__ sum_out) {
  constexpr int V = Vec<T>::kElems;
  const float rld = 1.f / H;
  for (int m = 0; m < rows; ++m) {
    const size_t row = (size_t)m * H;
    float mean_square = 0.f;
    for (int h = threadIdx.x * V; h < H; h += blockDim.x * V) {
      const Vec<T> s = skip_sum<T>(load_vec(input + row + h), nullptr, load_vec(skip + row + h), rld, mean_square);
      *reinterpret_cast<uint4*>(dst + row + h) = s.raw;
      if (sum_out) *reinterpret_cast<uint4*>(sum_out + row + h) = s.raw;
    }
    const float rsigma = rsqrtf(block_sum(mean_square) + epsilon);
    for (int h = threadIdx.x * V; h < H; h += blockDim.x * V)  // the pieces this thread wrote
      *reinterpret_cast<uint4*>(dst + row + h) = scaled<T>(load_vec(gamma + h), load_vec(dst + row + h), rsigma).raw;
  }
}

}  // namespace moe
