// The router's logits from the hidden states: logits [T, E] = x [T, H] W^T as float32, W the router's rows [E, H]
// (with Qwen2-MoE's shared-expert gate as row E, its logit written apart). One launch where ONNX Runtime ran the
// router MatMul on cuBLAS (a GEMV of 3.2 us a layer at A2.7B's 2048 x 61) and the fused op converted its 16-bit
// output to float32 in a second launch (1.0 us): the ort-cuda swap hands the MatMul's weight to the fused op
// (runtime/ort_kernels.py: fold_router_matmuls).
//
// A warp a logit: its lanes load 16 bytes of the row and of x at a time, 8 loads of the row in flight each (H = 2048
// in fp16 is one round), and add their partial sums by shuffles. Each logit is rounded to the model's dtype first,
// as the MatMul it replaces gives it. The launch starts as its predecessor's programmatic dependent: the row's first
// loads are in flight before it waits for x; and it lets the next launch start at once (the MoE's gate/up at T = 1,
// which waits for this one to end before it reads x or the logits).
#include "common.cuh"
#include "fused_moe.h"

namespace moe {
namespace {

constexpr int kRouterWarps = 4;  // logits a block
constexpr int kRouterLoads = 8;  // 16-byte loads of the row in flight per lane

template <typename T>
__global__ void __launch_bounds__(kRouterWarps* kWarp)
    router_logits_kernel(const T* __restrict__ x, const T* __restrict__ rows, int H, int E, int columns,
                         float* __restrict__ logits, float* __restrict__ gate) {
  allow_dependent_launch();
  constexpr int V = Vec<T>::kElems;
  const int lane = threadIdx.x % kWarp, n = blockIdx.y * kRouterWarps + threadIdx.x / kWarp, t = blockIdx.x;
  if (n >= columns) return;  // reads nothing
  const T* w = rows + (size_t)n * H;
  const T* xt = x + (size_t)t * H;
  float acc = 0.f;
  for (int base = 0; base < H; base += kRouterLoads * kWarp * V) {  // H % 8 == 0: a load is all in or all out
    Vec<T> wv[kRouterLoads];
#pragma unroll
    for (int q = 0; q < kRouterLoads; ++q) {
      const int h = base + (q * kWarp + lane) * V;
      wv[q].raw = h < H ? __ldcs(reinterpret_cast<const uint4*>(w + h)) : make_uint4(0, 0, 0, 0);
    }
    if (base == 0) wait_for_producer();  // x is the launch before's output
#pragma unroll
    for (int q = 0; q < kRouterLoads; ++q) {
      const int h = base + (q * kWarp + lane) * V;
      if (h < H) acc += dot_vec(wv[q], load_vec(xt + h));
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    const float rounded = to_float(from_float<T>(acc));
    if (n < E) logits[(size_t)t * E + n] = rounded;
    else gate[t] = rounded;
  }
}

template <typename T>
void launch_router_logits(const void* x, const void* rows, int T_, int H, int E, int columns, float* logits,
                          float* gate, cudaStream_t s) {
  launch_programmatic(true, router_logits_kernel<T>, dim3((unsigned)T_, (unsigned)ceil_div(columns, kRouterWarps)),
                      dim3(kRouterWarps * kWarp), 0, s, static_cast<const T*>(x), static_cast<const T*>(rows), H, E,
                      columns, logits, gate);
}

}  // namespace
}  // namespace moe

extern "C" int moe_compile_router_logits(const void* x, const void* rows, int32_t dtype, int64_t tokens, int64_t hidden,
                                         int64_t experts, int32_t gate_row, float* logits, float* gate,
                                         void* cuda_stream) {
  if (tokens < 0 || tokens > INT32_MAX || hidden < 8 || hidden % 8 || hidden > INT32_MAX / 2 || experts < 1 ||
      experts > 65535 || (gate_row != 0 && gate_row != 1))
    return MOE_ERR_INVALID_ARGUMENT;
  if (tokens == 0) return MOE_OK;
  // 16-byte loads of x and of the rows
  if (!x || !rows || !logits || (gate_row && !gate) || reinterpret_cast<uintptr_t>(x) % 16 ||
      reinterpret_cast<uintptr_t>(rows) % 16)
    return MOE_ERR_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  const int T_ = (int)tokens, H = (int)hidden, E = (int)experts, columns = E + gate_row;
  switch (dtype) {
    case MOE_DTYPE_F32: moe::launch_router_logits<float>(x, rows, T_, H, E, columns, logits, gate, s); break;
    case MOE_DTYPE_F16: moe::launch_router_logits<__half>(x, rows, T_, H, E, columns, logits, gate, s); break;
    case MOE_DTYPE_BF16: moe::launch_router_logits<__nv_bfloat16>(x, rows, T_, H, E, columns, logits, gate, s); break;
    default: return MOE_ERR_INVALID_ARGUMENT;
  }
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
