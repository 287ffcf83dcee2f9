// Weighted un-permute: out[t] = sum_k w[t,k] * y[entry_pos[t*K+k]], k in order, fp32 sums.
// One block per token; the fixed k order is what makes the result deterministic.
#include "common.cuh"
#include "kernels.h"

namespace moe {

template <typename T>
__global__ void unpermute_kernel(Problem p, Workspace ws, T* __restrict__ out) {
  constexpr int V = Vec<T>::kElems;
  const int t = blockIdx.x;
  const T* y = static_cast<const T*>(ws.y);
  for (int h = threadIdx.x * V; h < p.H; h += blockDim.x * V) {
    float acc[V] = {};
    for (int k = 0; k < p.K; ++k) {
      const int entry = t * p.K + k;
      const float wk = ws.topk_w[entry];
      const Vec<T> v = load_vec(y + (size_t)ws.entry_pos[entry] * p.H + h);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = fmaf(wk, v.get(i), acc[i]);
    }
    Vec<T> o;
#pragma unroll
    for (int i = 0; i < V; ++i) reinterpret_cast<T*>(&o.raw)[i] = from_float<T>(acc[i]);
    *reinterpret_cast<uint4*>(out + (size_t)t * p.H + h) = o.raw;
  }
}

void launch_unpermute(const Problem& p, const Workspace& ws, void* out, cudaStream_t s) {
  const int threads = 256;
  switch (p.dtype) {
    case MOE_DTYPE_F32: unpermute_kernel<float><<<p.T, threads, 0, s>>>(p, ws, static_cast<float*>(out)); break;
    case MOE_DTYPE_F16: unpermute_kernel<__half><<<p.T, threads, 0, s>>>(p, ws, static_cast<__half*>(out)); break;
    case MOE_DTYPE_BF16:
      unpermute_kernel<__nv_bfloat16><<<p.T, threads, 0, s>>>(p, ws, static_cast<__nv_bfloat16*>(out));
      break;
  }
}

}  // namespace moe
