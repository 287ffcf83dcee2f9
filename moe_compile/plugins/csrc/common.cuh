// Small helpers shared by the kernels: element types, 16-byte vectors, warp reductions, programmatic launches.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include <utility>

namespace moe {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T: the unit every streaming kernel loads (one LDG.128 per lane).
template <typename T> struct Vec {
  static constexpr int kElems = 16 / sizeof(T);
  uint4 raw;
  __device__ __forceinline__ float get(int i) const {
    return to_float(reinterpret_cast<const T*>(&raw)[i]);
  }
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> v;
  v.raw = *reinterpret_cast<const uint4*>(p);
  return v;
}

// Weights are read exactly once per launch: don't let them evict reused activations from L1.
template <typename T> __device__ __forceinline__ Vec<T> load_vec_stream(const T* p) {
  Vec<T> v;
  v.raw = __ldcs(reinterpret_cast<const uint4*>(p));
  return v;
}

template <typename T> __device__ __forceinline__ float dot_vec(const Vec<T>& a, const Vec<T>& b) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < Vec<T>::kElems; ++i) s = fmaf(a.get(i), b.get(i), s);
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float silu_mul(float gate, float up) {
  return gate / (1.f + __expf(-gate)) * up;
}

// KSPLIT consecutive warps of a block share a row group, each summing its slice of K into acc (the mma
// accumulators of NT n-tiles): the others' sums join the first warp's in a fixed order through shared memory. Every
// thread of the block calls it; false: this warp's sums went to the first one, which writes them.
template <int NT, int KSPLIT, int WARPS>
__device__ __forceinline__ bool add_split_sums(float (&acc)[NT][4]) {
  if constexpr (KSPLIT > 1) {
    __shared__ float sums[WARPS][NT * 4][kWarp];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) sums[warp][nt * 4 + i][lane] = acc[nt][i];
    __syncthreads();
    if (warp % KSPLIT != 0) return false;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        for (int other = 1; other < KSPLIT; ++other) acc[nt][i] += sums[warp + other][nt * 4 + i][lane];
  }
  return true;
}

// Programmatic dependent launch (sm_90+; a no-op before, where launches serialise anyway): the running kernel lets
// the next one, launched with the programmatic attribute, start; that one waits for it (its memory visible)
// before it reads what it wrote. Without such a launch, the wait returns at once.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether launches start as their stream predecessor's programmatic dependents (the MoE's down launch at T = 1,
// the decode attention's two, the quantized matmul): on sm_90 and later, unless MOE_COMPILE_PROGRAMMATIC_LAUNCH=0
// (read per call: same-process comparisons).
inline bool programmatic_launch() {
  const char* env = getenv("MOE_COMPILE_PROGRAMMATIC_LAUNCH");
  if (env && atoi(env) == 0) return false;
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
}

// Launches `kernel` as its stream predecessor's programmatic dependent where `early` and programmatic_launch() hold
// (the kernel then calls wait_for_producer in every block before it reads what that one wrote), else plainly.
// Errors reach the caller through cudaGetLastError.
template <typename... Params, typename... Args>
void launch_programmatic(bool early, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                         Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = early && programmatic_launch() ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moe
