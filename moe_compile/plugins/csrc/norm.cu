// Skip + RMS norm: com.microsoft:SkipSimplifiedLayerNormalization's contract, on our kernels so that the launch chain
// of a decode step stays programmatic (the ort-cuda swap: runtime/ort_kernels.py swap_norm_nodes). ONNX Runtime's
// kernel never lets its dependent start early, so the quantized q/k/v matmul after it (quant_matmul.cu) could not
// have its weights in flight while the norm runs; this one lets the next launch start first thing.
//
//   sum = input + skip (+ bias);  out = sum * rsqrt(mean(sum^2) + epsilon) * gamma;  sum_out = sum (optional)
//
// Rounded as ONNX Runtime's CUDA kernel rounds (contrib_ops/cuda/bert/skip_layer_norm_impl.cu and layer_norm.cuh,
// the fp32-accumulating version): sum in the 16-bit type, input + bias first, then + skip, each addition rounded;
// the squares of that rounded sum, each scaled by 1/H before it is added, in fp32; rsqrtf(mean + epsilon); the output
// (gamma * sum) * rsigma in fp32, rounded once. Only the fp32 sum's order differs (warps, then the block).
//
// One block a row, a 16-byte load of input and of skip per thread (H = 2048 in fp16: 256 threads, one load each),
// up to kNormLoads a thread for wider rows, the rounded sums kept in registers for the second pass.
#include "common.cuh"
#include "fused_moe.h"

namespace moe {
namespace {

constexpr int kNormMaxThreads = 1024;
constexpr int kNormLoads = 4;  // 16-byte loads of a row per thread, at most

// The block's sum in a fixed order (each warp's, then the warps' in turn, by every thread alike): the same bits every
// run, and every thread holds it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kNormMaxThreads / kWarp];
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)blockDim.x / kWarp; ++w) total += warp_sums[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kNormMaxThreads)
    skip_rms_norm_kernel(const T* __restrict__ input, const T* __restrict__ skip, const T* __restrict__ bias,
                         const T* __restrict__ gamma, int H, float epsilon, T* __restrict__ out,
                         T* __restrict__ sum_out) {
  allow_dependent_launch();
  constexpr int V = Vec<T>::kElems;
  const size_t row = (size_t)blockIdx.x * H;
  Vec<T> g[kNormLoads], b[kNormLoads], s[kNormLoads];
#pragma unroll
  for (int q = 0; q < kNormLoads; ++q) {  // gamma and bias are constants: in flight before the wait
    const int h = (q * blockDim.x + threadIdx.x) * V;
    if (h < H) {
      g[q] = load_vec(gamma + h);
      if (bias) b[q] = load_vec(bias + h);
    }
  }
  wait_for_producer();  // input and skip are the launches before's outputs
  const float rld = 1.f / H;
  float mean_square = 0.f;
#pragma unroll
  for (int q = 0; q < kNormLoads; ++q) {
    const int h = (q * blockDim.x + threadIdx.x) * V;
    if (h >= H) continue;  // H % 8 == 0: a load is all in or all out
    const Vec<T> x = load_vec(input + row + h), k = load_vec(skip + row + h);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // a float sum of two 16-bit values rounded to 16 bits is the 16-bit addition's result (24 >= 2 * 11 + 2 bits)
      float v = x.get(i);
      if (bias) v = to_float(from_float<T>(v + b[q].get(i)));
      const T rounded = from_float<T>(v + k.get(i));
      reinterpret_cast<T*>(&s[q].raw)[i] = rounded;
      v = to_float(rounded);
      mean_square += rld * v * v;
    }
    if (sum_out) *reinterpret_cast<uint4*>(sum_out + row + h) = s[q].raw;
  }
  const float rsigma = rsqrtf(block_sum(mean_square) + epsilon);
#pragma unroll
  for (int q = 0; q < kNormLoads; ++q) {
    const int h = (q * blockDim.x + threadIdx.x) * V;
    if (h >= H) continue;
    Vec<T> o;
#pragma unroll
    for (int i = 0; i < V; ++i) reinterpret_cast<T*>(&o.raw)[i] = from_float<T>(g[q].get(i) * s[q].get(i) * rsigma);
    *reinterpret_cast<uint4*>(out + row + h) = o.raw;
  }
}

// Threads a row: one 16-byte load each up to kNormMaxThreads, whole warps (block_sum); more loads each beyond.
int norm_threads(int64_t H, int V) {
  const int64_t loads = ceil_div(H, V);
  return (int)(loads >= kNormMaxThreads ? kNormMaxThreads : ceil_div(loads, kWarp) * kWarp);
}

template <typename T>
void launch_skip_rms_norm(const void* input, const void* skip, const void* bias, const void* gamma, int rows, int H,
                          float epsilon, void* out, void* sum_out, cudaStream_t s) {
  launch_programmatic(true, skip_rms_norm_kernel<T>, dim3((unsigned)rows), dim3(norm_threads(H, Vec<T>::kElems)), 0, s,
                      static_cast<const T*>(input), static_cast<const T*>(skip), static_cast<const T*>(bias),
                      static_cast<const T*>(gamma), H, epsilon, static_cast<T*>(out), static_cast<T*>(sum_out));
}

}  // namespace
}  // namespace moe

extern "C" int moe_compile_skip_rms_norm(const void* input, const void* skip, const void* bias, const void* gamma,
                                         int32_t dtype, int64_t rows, int64_t hidden, float epsilon, void* out,
                                         void* sum_out, void* cuda_stream) {
  const int64_t element = dtype == MOE_DTYPE_F32 ? 4 : 2;
  const int64_t widest = (int64_t)moe::kNormMaxThreads * moe::kNormLoads * (16 / element);
  if (rows < 0 || rows > INT32_MAX || hidden < 8 || hidden % 8 || hidden > widest)
    return MOE_ERR_INVALID_ARGUMENT;
  if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return MOE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return MOE_OK;
  // 16-byte loads and stores of every row
  const void* aligned[6] = {input, skip, bias, gamma, out, sum_out};
  for (const void* p : aligned)
    if (reinterpret_cast<uintptr_t>(p) % 16) return MOE_ERR_INVALID_ARGUMENT;
  if (!input || !skip || !gamma || !out) return MOE_ERR_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  const int R = (int)rows, H = (int)hidden;
  switch (dtype) {
    case MOE_DTYPE_F32:
      moe::launch_skip_rms_norm<float>(input, skip, bias, gamma, R, H, epsilon, out, sum_out, s);
      break;
    case MOE_DTYPE_F16:
      moe::launch_skip_rms_norm<__half>(input, skip, bias, gamma, R, H, epsilon, out, sum_out, s);
      break;
    case MOE_DTYPE_BF16:
      moe::launch_skip_rms_norm<__nv_bfloat16>(input, skip, bias, gamma, R, H, epsilon, out, sum_out, s);
      break;
  }
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
