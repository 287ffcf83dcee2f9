// Elementwise helpers around the MoE kernels:
//   to_float:  row-strided conversion to fp32 (the plugins receive router logits in the model's dtype,
//              com.microsoft:MoE types them like the input, while routing reads fp32)
//   silu_mul:  act = silu(gate) * up of [rows, 2I] GEMM outputs (the ORT op's shared expert beyond decode)
//   add_gated: out[t] += g_t * y[t], g_t = sigmoid(gate_logits[t]) or 1 (the shared expert's term)
//   dequantize: block-quantized expert codes -> the float weights (quantized experts beyond decode sizes)
#include "common.cuh"
#include "fused_moe.h"
#include "kernels.h"

namespace moe {
namespace {

template <typename T>
__global__ void to_float_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t n, int64_t cols,
                                int64_t stride) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = to_float(src[i / cols * stride + i % cols]);
}

template <typename T> void launch(const void* src, float* dst, int64_t n, int64_t cols, int64_t stride, cudaStream_t s) {
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  to_float_kernel<T><<<(unsigned)(blocks < 4096 ? blocks : 4096), threads, 0, s>>>(static_cast<const T*>(src), dst, n,
                                                                                  cols, stride);
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ act, int64_t rows, int64_t inter) {
  const int64_t n = rows * inter;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inter, j = i % inter;
    act[i] = from_float<T>(silu_mul(to_float(gate_up[r * 2 * inter + j]), to_float(gate_up[r * 2 * inter + inter + j])));
  }
}

template <typename T> void launch_silu_mul(const void* gate_up, void* act, int64_t rows, int64_t inter, cudaStream_t s) {
  const int threads = 256;
  const int64_t blocks = (rows * inter + threads - 1) / threads;
  silu_mul_kernel<T><<<(unsigned)(blocks < 4096 ? blocks : 4096), threads, 0, s>>>(
      static_cast<const T*>(gate_up), static_cast<T*>(act), rows, inter);
}

}  // namespace

template <typename T>
__global__ void add_shared_kernel(Problem p, const T* __restrict__ y, const float* __restrict__ gate_logits,
                                  T* __restrict__ out) {
  constexpr int V = Vec<T>::kElems;
  const int t = blockIdx.x;
  const float g = gate_logits ? 1.f / (1.f + __expf(-gate_logits[t])) : 1.f;
  for (int h = threadIdx.x * V; h < p.H; h += blockDim.x * V) {
    const Vec<T> a = load_vec(out + (size_t)t * p.H + h), b = load_vec(y + (size_t)t * p.H + h);
    Vec<T> o;
#pragma unroll
    for (int i = 0; i < V; ++i) reinterpret_cast<T*>(&o.raw)[i] = from_float<T>(fmaf(g, b.get(i), a.get(i)));
    *reinterpret_cast<uint4*>(out + (size_t)t * p.H + h) = o.raw;
  }
}

void launch_add_shared(const Problem& p, const void* y, const float* gate_logits, void* out, cudaStream_t s) {
  const int threads = 256;
  switch (p.dtype) {
    case MOE_DTYPE_F32:
      add_shared_kernel<float><<<p.T, threads, 0, s>>>(p, static_cast<const float*>(y), gate_logits,
                                                       static_cast<float*>(out));
      break;
    case MOE_DTYPE_F16:
      add_shared_kernel<__half><<<p.T, threads, 0, s>>>(p, static_cast<const __half*>(y), gate_logits,
                                                        static_cast<__half*>(out));
      break;
    case MOE_DTYPE_BF16:
      add_shared_kernel<__nv_bfloat16><<<p.T, threads, 0, s>>>(p, static_cast<const __nv_bfloat16*>(y), gate_logits,
                                                               static_cast<__nv_bfloat16*>(out));
      break;
  }
}

// One thread a byte of codes: its 1 (int8) or 2 (int4, the lower nibble first) weights.
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const T* __restrict__ scales, int64_t bytes,
                                  int64_t K, int bits, int block, T* __restrict__ out) {
  const int per_byte = 8 / bits, zero = 1 << (bits - 1);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < bytes; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t first = i * per_byte, row = first / K, k = first % K;
    const float scale = to_float(scales[row * (K / block) + k / block]);
    const uint32_t byte = codes[i];
    for (int j = 0; j < per_byte; ++j) {
      const int u = bits == 8 ? (int)byte : (int)((byte >> (4 * j)) & 0xFu);
      out[first + j] = from_float<T>((float)(u - zero) * scale);
    }
  }
}

void launch_dequantize(const void* codes, const void* scales, int64_t rows, int64_t K, int bits, int block,
                       moe_dtype dtype, void* out, cudaStream_t s) {
  const int threads = 256;
  const int64_t bytes = rows * K * bits / 8, blocks = ceil_div(bytes, threads);
  const unsigned grid = (unsigned)(blocks < 65536 ? blocks : 65536);
  const uint8_t* c = static_cast<const uint8_t*>(codes);
  switch (dtype) {
    case MOE_DTYPE_F32:
      dequantize_kernel<float><<<grid, threads, 0, s>>>(c, static_cast<const float*>(scales), bytes, K, bits, block,
                                                        static_cast<float*>(out));
      break;
    case MOE_DTYPE_F16:
      dequantize_kernel<__half><<<grid, threads, 0, s>>>(c, static_cast<const __half*>(scales), bytes, K, bits, block,
                                                         static_cast<__half*>(out));
      break;
    case MOE_DTYPE_BF16:
      dequantize_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(c, static_cast<const __nv_bfloat16*>(scales), bytes, K,
                                                                bits, block, static_cast<__nv_bfloat16*>(out));
      break;
  }
}

}  // namespace moe

extern "C" int moe_compile_to_float(const void* src, int32_t dtype, float* dst, int64_t rows, int64_t cols,
                                    int64_t src_row_stride, void* cuda_stream) {
  if (rows < 0 || cols < 0 || src_row_stride < cols) return MOE_ERR_INVALID_ARGUMENT;
  const int64_t n = rows * cols;
  if (n > 0 && (!src || !dst)) return MOE_ERR_INVALID_ARGUMENT;
  if (n == 0) return MOE_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  switch (dtype) {
    case MOE_DTYPE_F32: moe::launch<float>(src, dst, n, cols, src_row_stride, s); break;
    case MOE_DTYPE_F16: moe::launch<__half>(src, dst, n, cols, src_row_stride, s); break;
    case MOE_DTYPE_BF16: moe::launch<__nv_bfloat16>(src, dst, n, cols, src_row_stride, s); break;
    default: return MOE_ERR_INVALID_ARGUMENT;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}

extern "C" int moe_compile_silu_mul(const void* gate_up, int32_t dtype, void* act, int64_t rows, int64_t intermediate,
                                    void* cuda_stream) {
  if (rows < 0 || intermediate < 0 || (rows * intermediate > 0 && (!gate_up || !act))) return MOE_ERR_INVALID_ARGUMENT;
  if (rows * intermediate == 0) return MOE_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  switch (dtype) {
    case MOE_DTYPE_F32: moe::launch_silu_mul<float>(gate_up, act, rows, intermediate, s); break;
    case MOE_DTYPE_F16: moe::launch_silu_mul<__half>(gate_up, act, rows, intermediate, s); break;
    case MOE_DTYPE_BF16: moe::launch_silu_mul<__nv_bfloat16>(gate_up, act, rows, intermediate, s); break;
    default: return MOE_ERR_INVALID_ARGUMENT;
  }
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}

extern "C" int moe_compile_add_gated(void* out, const void* y, const float* gate_logits, int32_t dtype, int64_t rows,
                                     int64_t hidden, void* cuda_stream) {
  if (rows < 0 || hidden < 8 || hidden % 8 || rows > INT32_MAX || hidden > INT32_MAX) return MOE_ERR_INVALID_ARGUMENT;
  if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return MOE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return MOE_OK;
  if (!out || !y) return MOE_ERR_INVALID_ARGUMENT;
  moe::Problem p{};
  p.T = (int)rows;
  p.H = (int)hidden;
  p.dtype = static_cast<moe_dtype>(dtype);
  moe::launch_add_shared(p, y, gate_logits, out, static_cast<cudaStream_t>(cuda_stream));
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
