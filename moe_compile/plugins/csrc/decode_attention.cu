// GroupQueryAttention's decode step (one new token a row, the KV cache a shared [B, KV, max_seq, D] buffer) in two
// launches where ONNX Runtime takes five (sequence lengths, rotary + append, flash decode, its reduction, a fill:
// 12.7 us a layer at batch 1 on the H200, A2.7B shape; docs/BENCHMARKS.md).
//
//   attention  grid (KV heads, B, max_seq / kChunk): block (h, b, c) reads cache rows [c kChunk, (c+1) kChunk) of
//              KV head h up to the row's length seqlens_k[b] + 1 (blocks past it return at once: the grid is fixed
//              by max_seq, so that a CUDA graph replays it at every length). It rotates the G = N / KV query
//              heads of its group, the block holding position seqlens_k[b] rotates the new key and writes key and
//              value into the cache, then scores, softmax and P V over its rows, for the G heads at once (each
//              cache row read once for all of them). One chunk: the output; more: (max, sum, P V) per chunk.
//   combine    grid (N heads, B): the chunks' partial softmaxes merged (rows of one chunk return at once).
//
// Rotary as GroupQueryAttention's do_rotary = 1, rotary_interleaved = 0: the first 2 R/2 dims of a head rotate
// in halves by cos/sin[position, R/2], position = seqlens_k[b]; q and the new k are rounded to the cache's type
// after rotation, as ONNX Runtime's kernels store them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"
#include "fused_moe.h"

namespace moe {
namespace {

constexpr int kChunk = 64;        // cache rows a block reads
constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / kWarp;

// E consecutive 16-bit elements of a row, as floats, in one load.
template <typename T, int E>
__device__ __forceinline__ void load_row(const T* p, float (&out)[E]) {
  static_assert(E == 1 || E == 2 || E == 4 || E == 8, "1, 2, 4 or 8 elements a lane");
  using Word = typename std::conditional<E == 8, uint4, typename std::conditional<E == 4, uint2,
               typename std::conditional<E == 2, uint32_t, uint16_t>::type>::type>::type;
  const Word word = *reinterpret_cast<const Word*>(p);
  const T* v = reinterpret_cast<const T*>(&word);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = to_float(v[e]);
}

// x[d] of one head after GroupQueryAttention's half-split rotary (rotary_half = R/2 pairs; 0: no rotary).
template <typename T>
__device__ __forceinline__ float rotated(const T* x, int d, const T* cos, const T* sin, int rotary_half) {
  const float v = to_float(x[d]);
  if (d >= 2 * rotary_half) return v;
  const int i = d < rotary_half ? d : d - rotary_half;
  const float c = to_float(cos[i]), s = to_float(sin[i]);
  return d < rotary_half ? v * c - to_float(x[d + rotary_half]) * s : v * c + to_float(x[d - rotary_half]) * s;
}

struct AttentionArgs {
  const void* q;  // [B, q_stride]: row b's N query heads at q + b q_stride
  const void* k;  // [B, kv_stride]: the new token's KV heads
  const void* v;
  int64_t q_stride, kv_stride;
  void* k_cache;  // [B, KV, max_seq, D], written at position seqlens_k[b]
  void* v_cache;
  const int32_t* seqlens_k;  // [B]: the new token's position (ONNX Runtime: total length - 1)
  const void* cos;           // [positions, rotary_half]
  const void* sin;
  int rotary_half;
  int kv_heads, max_seq, chunks;
  float scale;
  float* partial;  // [B, KV, chunks, G, D + 2]: P V, then max and sum of each chunk
  void* out;       // [B, N D]
};

template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttentionArgs a) {
  constexpr int E = D >= kWarp ? D / kWarp : 1;  // dims a lane holds in the score loop
  constexpr int kRowLanes = D / E, kRowsAtOnce = kWarp / kRowLanes;
  const int h = blockIdx.x, b = blockIdx.y, chunk = blockIdx.z;
  const int position = a.seqlens_k[b], length = min(position + 1, a.max_seq);  // no row past the buffer
  const int start = chunk * kChunk, rows = min(kChunk, length - start);
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  T* out = static_cast<T*>(a.out) + ((int64_t)b * a.kv_heads * G + (int64_t)h * G) * D;
  if (rows <= 0) {
    if (chunk == 0)  // an empty row (no token yet): zeros, not what the buffer held
      for (int i = tid; i < G * D; i += kAttnThreads) out[i] = from_float<T>(0.f);
    return;
  }
  __shared__ float q_s[G][D];
  __shared__ float p_s[G][kChunk];
  __shared__ float max_s[G], sum_s[G];
  const int64_t cache_head = ((int64_t)b * a.kv_heads + h) * a.max_seq;
  const T* cos = static_cast<const T*>(a.cos) + (int64_t)position * a.rotary_half;
  const T* sin = static_cast<const T*>(a.sin) + (int64_t)position * a.rotary_half;
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + (int64_t)h * G * D;
  for (int i = tid; i < G * D; i += kAttnThreads)  // rotated, rounded as stored, then scaled
    q_s[i / D][i % D] = to_float(from_float<T>(rotated(q + (i / D) * D, i % D, cos, sin, a.rotary_half))) * a.scale;
  T* k_cache = static_cast<T*>(a.k_cache) + cache_head * D;
  T* v_cache = static_cast<T*>(a.v_cache) + cache_head * D;
  if (position >= start && position < start + rows) {  // this block's rows hold the new token: append it
    const T* k = static_cast<const T*>(a.k) + b * a.kv_stride + (int64_t)h * D;
    const T* v = static_cast<const T*>(a.v) + b * a.kv_stride + (int64_t)h * D;
    for (int d = tid; d < D; d += kAttnThreads) {
      k_cache[(int64_t)position * D + d] = from_float<T>(rotated(k, d, cos, sin, a.rotary_half));
      v_cache[(int64_t)position * D + d] = v[d];
    }
  }
  __syncthreads();  // q_s, and the appended row, visible to the whole block

  // Scores: kRowLanes lanes a row (a warp, or half of one for D = 16), E dims a lane, for the G heads.
  for (int r0 = warp * kRowsAtOnce; r0 < rows; r0 += kAttnWarps * kRowsAtOnce) {
    const int r = r0 + lane / kRowLanes, row_lane = lane % kRowLanes;
    float key[E] = {};
    if (r < rows) load_row<T, E>(k_cache + (int64_t)(start + r) * D + row_lane * E, key);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s += q_s[g][row_lane * E + e] * key[e];
#pragma unroll
      for (int offset = kRowLanes / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (row_lane == 0 && r < rows) p_s[g][r] = s;
    }
  }
  __syncthreads();
  // Softmax over the chunk's rows: a warp a head.
  for (int g = warp; g < G; g += kAttnWarps) {
    float m = -INFINITY;
    for (int r = lane; r < rows; r += kWarp) m = fmaxf(m, p_s[g][r]);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float sum = 0.f;
    for (int r = lane; r < rows; r += kWarp) {
      const float p = __expf(p_s[g][r] - m);
      p_s[g][r] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      max_s[g] = m;
      sum_s[g] = sum;
    }
  }
  __syncthreads();
  // P V: a thread a dim (D < 128: the rows split among kAttnThreads / D groups), for the G heads.
  constexpr int kDims = D < kAttnThreads ? 1 : D / kAttnThreads;  // dims a thread sums
  constexpr int kGroups = D < kAttnThreads ? kAttnThreads / D : 1;
  const int group = tid / (D / kDims), d0 = (tid % (D / kDims)) * kDims;
  float acc[G][kDims] = {};
  for (int r = group; r < rows; r += kGroups) {
    const T* row = v_cache + (int64_t)(start + r) * D + d0;
#pragma unroll
    for (int j = 0; j < kDims; ++j) {
      const float value = to_float(row[j]);
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g][j] += p_s[g][r] * value;
    }
  }
  if (kGroups > 1) {  // the groups' sums into q_s (free now)
    __syncthreads();
    for (int i = tid; i < G * D; i += kAttnThreads) q_s[i / D][i % D] = 0.f;
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) atomicAdd(&q_s[g][d0], acc[g][0]);
    __syncthreads();
    if (group != 0) return;
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g][0] = q_s[g][d0];
  }
  if (length <= kChunk) {  // one chunk: the output itself
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < kDims; ++j) out[g * D + d0 + j] = from_float<T>(acc[g][j] / sum_s[g]);
    return;
  }
  float* partial = a.partial + ((((int64_t)b * a.kv_heads + h) * a.chunks + chunk) * G) * (D + 2);
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < kDims; ++j) partial[g * (D + 2) + d0 + j] = acc[g][j];
    if (tid == 0) {
      partial[g * (D + 2) + D] = max_s[g];
      partial[g * (D + 2) + D + 1] = sum_s[g];
    }
  }
}

// Merges the chunks' partial softmaxes of head n of row b: block (n, b), a thread a dim.
template <typename T, int D, int G>
__global__ void __launch_bounds__(D < kAttnThreads ? D : kAttnThreads) combine_kernel(AttentionArgs a) {
  const int n = blockIdx.x, b = blockIdx.y, h = n / G, g = n % G;
  const int length = min(a.seqlens_k[b] + 1, a.max_seq);
  if (length <= kChunk) return;  // one chunk wrote the output
  const int chunks = (length + kChunk - 1) / kChunk;
  const float* partial = a.partial + (((int64_t)b * a.kv_heads + h) * a.chunks * G + g) * (D + 2);
  const int64_t step = (int64_t)G * (D + 2);  // from one chunk to the next
  float m = -INFINITY;
  for (int c = 0; c < chunks; ++c) m = fmaxf(m, partial[c * step + D]);
  float sum = 0.f;
  for (int c = 0; c < chunks; ++c) sum += partial[c * step + D + 1] * __expf(partial[c * step + D] - m);
  T* out = static_cast<T*>(a.out) + ((int64_t)b * a.kv_heads * G + n) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += partial[c * step + d] * __expf(partial[c * step + D] - m);
    out[d] = from_float<T>(acc / sum);
  }
}

template <typename T, int D, int G>
void launch_attention(const AttentionArgs& a, int batch, cudaStream_t s) {
  decode_attention_kernel<T, D, G><<<dim3(a.kv_heads, batch, a.chunks), kAttnThreads, 0, s>>>(a);
  if (a.chunks > 1)
    combine_kernel<T, D, G><<<dim3(a.kv_heads * G, batch), D < kAttnThreads ? D : kAttnThreads, 0, s>>>(a);
}

template <typename T, int D>
bool launch_group(const AttentionArgs& a, int batch, int group, cudaStream_t s) {
  switch (group) {
    case 1: launch_attention<T, D, 1>(a, batch, s); return true;
    case 2: launch_attention<T, D, 2>(a, batch, s); return true;
    case 4: launch_attention<T, D, 4>(a, batch, s); return true;
    case 8: launch_attention<T, D, 8>(a, batch, s); return true;
    case 16: launch_attention<T, D, 16>(a, batch, s); return true;
    default: return false;
  }
}

template <typename T>
bool launch_dims(const AttentionArgs& a, int batch, int head_dim, int group, cudaStream_t s) {
  switch (head_dim) {
    case 16: return launch_group<T, 16>(a, batch, group, s);
    case 32: return launch_group<T, 32>(a, batch, group, s);
    case 64: return launch_group<T, 64>(a, batch, group, s);
    case 128: return launch_group<T, 128>(a, batch, group, s);
    case 256: return launch_group<T, 256>(a, batch, group, s);
    default: return false;
  }
}

}  // namespace
}  // namespace moe

extern "C" int moe_compile_decode_attention_supported(int64_t num_heads, int64_t kv_heads, int64_t head_dim) {
  if (num_heads <= 0 || kv_heads <= 0 || num_heads % kv_heads) return 0;
  const int64_t group = num_heads / kv_heads;
  const bool dims = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return dims && (group == 1 || group == 2 || group == 4 || group == 8 || group == 16);
}

extern "C" size_t moe_compile_decode_attention_workspace_size(int64_t batch, int64_t num_heads, int64_t head_dim,
                                                              int64_t max_seq) {
  const int64_t chunks = (max_seq + moe::kChunk - 1) / moe::kChunk;
  return chunks > 1 ? (size_t)(batch * num_heads * chunks * (head_dim + 2)) * sizeof(float) : 0;
}

extern "C" int moe_compile_decode_attention(const void* query, const void* key, const void* value, int64_t q_stride,
                                            int64_t kv_stride, const void* past_key, const void* past_value,
                                            void* present_key, void* present_value, const int32_t* seqlens_k,
                                            const void* cos_cache, const void* sin_cache, int64_t rotary_half,
                                            int64_t batch, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                            int64_t max_seq, float scale, int32_t dtype, void* out, void* workspace,
                                            size_t workspace_bytes, void* cuda_stream) {
  if (batch < 0 || max_seq <= 0 || max_seq > INT32_MAX / 2 || rotary_half < 0 || 2 * rotary_half > head_dim ||
      !moe_compile_decode_attention_supported(num_heads, kv_heads, head_dim) ||
      (dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16))
    return MOE_ERR_INVALID_ARGUMENT;
  if (batch == 0) return MOE_OK;
  if (workspace_bytes < moe_compile_decode_attention_workspace_size(batch, num_heads, head_dim, max_seq))
    return MOE_ERR_WORKSPACE_TOO_SMALL;
  if (!query || !key || !value || !present_key || !present_value || !seqlens_k || !out ||
      (rotary_half && (!cos_cache || !sin_cache)))
    return MOE_ERR_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  const size_t cache_bytes = (size_t)(batch * kv_heads * max_seq * head_dim) * 2;
  // past and present are one buffer when the caller binds them so (the runtime does); else the past is copied first
  if (past_key && past_key != present_key &&
      cudaMemcpyAsync(present_key, past_key, cache_bytes, cudaMemcpyDeviceToDevice, s) != cudaSuccess)
    return MOE_ERR_CUDA;
  if (past_value && past_value != present_value &&
      cudaMemcpyAsync(present_value, past_value, cache_bytes, cudaMemcpyDeviceToDevice, s) != cudaSuccess)
    return MOE_ERR_CUDA;
  moe::AttentionArgs a{query, key, value, q_stride, kv_stride, present_key, present_value, seqlens_k, cos_cache,
                       sin_cache, (int)rotary_half, (int)kv_heads, (int)max_seq,
                       (int)((max_seq + moe::kChunk - 1) / moe::kChunk), scale, static_cast<float*>(workspace), out};
  const int group = (int)(num_heads / kv_heads);
  const bool launched = dtype == MOE_DTYPE_F16 ? moe::launch_dims<__half>(a, (int)batch, (int)head_dim, group, s)
                                               : moe::launch_dims<__nv_bfloat16>(a, (int)batch, (int)head_dim, group, s);
  if (!launched) return MOE_ERR_INVALID_ARGUMENT;
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}

extern "C" int moe_compile_device_synchronize(void) {
  return cudaDeviceSynchronize() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
