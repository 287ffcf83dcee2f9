// Element-type conversion to fp32: the TensorRT plugin receives router logits in the model's dtype
// (com.microsoft:MoE types them like the input) while routing reads fp32.
#include "common.cuh"
#include "fused_moe.h"

namespace moe {
namespace {

template <typename T>
__global__ void to_float_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = to_float(src[i]);
}

template <typename T> void launch(const void* src, float* dst, int64_t n, cudaStream_t s) {
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  to_float_kernel<T><<<(unsigned)(blocks < 4096 ? blocks : 4096), threads, 0, s>>>(static_cast<const T*>(src), dst, n);
}

}  // namespace
}  // namespace moe

extern "C" int moe_compile_to_float(const void* src, int32_t dtype, float* dst, int64_t n, void* cuda_stream) {
  if (n < 0 || (n > 0 && (!src || !dst))) return MOE_ERR_INVALID_ARGUMENT;
  if (n == 0) return MOE_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  switch (dtype) {
    case MOE_DTYPE_F32: moe::launch<float>(src, dst, n, s); break;
    case MOE_DTYPE_F16: moe::launch<__half>(src, dst, n, s); break;
    case MOE_DTYPE_BF16: moe::launch<__nv_bfloat16>(src, dst, n, s); break;
    default: return MOE_ERR_INVALID_ARGUMENT;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
