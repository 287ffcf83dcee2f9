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

// One thread a 16-byte load of codes: its C = 128 / BITS weights (int4: the lower nibble first), written as 16-byte
// stores. A row holds a whole number of loads and a load lies inside one block (K % block == 0, block % C == 0,
// launcher.cu checks both), so weight n = C i of load i has the scale n / block: no per-row arithmetic.
template <typename T, int BITS>
__global__ void dequantize_kernel(const uint4* __restrict__ codes, const T* __restrict__ scales, int64_t loads,
                                  int block, T* __restrict__ out) {
  constexpr int C = 128 / BITS, zero = 1 << (BITS - 1), kPerStore = 16 / sizeof(T);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < loads; i += (int64_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(codes + i);
    const float scale = to_float(scales[i * C / block]);
    const uint32_t* words = &v.x;
#pragma unroll
    for (int st = 0; st < C / kPerStore; ++st) {
      uint4 packed;
      T* vals = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int j = 0; j < kPerStore; ++j) {
        const int n = st * kPerStore + j;  // weight n of the load
        const int u = BITS == 4 ? (int)((words[n / 8] >> (4 * (n % 8))) & 0xFu) : (int)((words[n / 4] >> (8 * (n % 4))) & 0xFFu);
        vals[j] = from_float<T>((float)(u - zero) * scale);
      }
      reinterpret_cast<uint4*>(out + i * C)[st] = packed;
    }
  }
}

template <typename T, int BITS>
void launch_dequantize_as(const void* codes, const void* scales, int64_t loads, int block, void* out, cudaStream_t s) {
  const int threads = 256;
  const int64_t blocks = ceil_div(loads, threads);
  dequantize_kernel<T, BITS><<<(unsigned)(blocks < 65536 ? blocks : 65536), threads, 0, s>>>(
      static_cast<const uint4*>(codes), static_cast<const T*>(scales), loads, block, static_cast<T*>(out));
}

template <typename T>
void launch_dequantize_bits(const void* codes, const void* scales, int64_t loads, int bits, int block, void* out,
                            cudaStream_t s) {
  if (bits == 4) launch_dequantize_as<T, 4>(codes, scales, loads, block, out, s);
  else launch_dequantize_as<T, 8>(codes, scales, loads, block, out, s);
}

void launch_dequantize(const void* codes, const void* scales, int64_t rows, int64_t K, int bits, int block,
                       moe_dtype dtype, void* out, cudaStream_t s) {
  const int64_t loads = rows * K * bits / 128;
  switch (dtype) {
    case MOE_DTYPE_F32: launch_dequantize_bits<float>(codes, scales, loads, bits, block, out, s); break;
    case MOE_DTYPE_F16: launch_dequantize_bits<__half>(codes, scales, loads, bits, block, out, s); break;
    case MOE_DTYPE_BF16: launch_dequantize_bits<__nv_bfloat16>(codes, scales, loads, bits, block, out, s); break;
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

extern "C" int moe_compile_dequantize(const void* codes, const void* scales, int64_t rows, int64_t K, int32_t bits,
                                      int32_t block_size, int32_t dtype, void* out, void* cuda_stream) {
  const bool block_ok = block_size == 32 || block_size == 64 || block_size == 128;
  if (rows < 0 || K <= 0 || (bits != 4 && bits != 8) || !block_ok || K % block_size) return MOE_ERR_INVALID_ARGUMENT;
  if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return MOE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return MOE_OK;
  // 16-byte loads of codes and stores of weights
  if (!codes || !scales || !out || reinterpret_cast<uintptr_t>(codes) % 16 || reinterpret_cast<uintptr_t>(out) % 16)
    return MOE_ERR_INVALID_ARGUMENT;
  moe::launch_dequantize(codes, scales, rows, K, bits, block_size, static_cast<moe_dtype>(dtype), out,
                         static_cast<cudaStream_t>(cuda_stream));
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
