// GroupQueryAttention's decode step (one new token a row, the KV cache a shared [B, KV, max_seq, D] buffer) in two
// launches where ONNX Runtime takes five (sequence lengths, rotary + append, flash decode, its reduction, a fill:
// 12.7 us a layer at batch 1 on the H200, A2.7B shape; docs/BENCHMARKS.md).
//
//   attention  grid (KV heads, B, splits): a row's cache is cut into tiles of 8 KB of keys (tile_rows(D) rows) up
//              to its length seqlens_k[b] + 1, and split s of (h, b) takes the s-th of `splits` near-equal runs of
//              tiles; splits without a tile return at once. The split count depends on B, KV and max_seq only
//              (enough blocks to fill the GPU at batch 1), so a CUDA graph replays the launch at every length. A
//              block streams its tiles' keys and values into shared memory two at a time (cp.async), rotates the
//              G = N / KV query heads of its group, and the block holding position seqlens_k[b] rotates the new key
//              and writes key and value into the cache (and into its tile). Then, per tile, scores, an online
//              softmax and P V for the G heads at once (each cache row read once for all of them). One split with
//              tiles: the output; more: (P V, max, sum) per split, and with counters the last split of (h, b) to
//              finish (an atomic count, which it sets back to zero) merges them into the output: one launch a layer.
//   combine    without counters, grid (N heads, B): the splits' partial softmaxes merged (rows with one busy split
//              return at once).
// Both start as programmatic dependents of the launch before them (sm_90+, common.cuh: programmatic_launch) and
// wait for it before reading: their start-up overlaps its end.
//
// Rotary as GroupQueryAttention's do_rotary = 1, rotary_interleaved = 0: the first 2 R/2 dims of a head rotate
// in halves by cos/sin[position, R/2], position = seqlens_k[b]; q and the new k are rounded to the cache's type
// after rotation, as ONNX Runtime's kernels store them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "fused_moe.h"
#include "mma.cuh"

namespace moe {
namespace {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / kWarp;
constexpr int kTargetBlocks = 256;  // blocks a launch aims at: about two an SM on the H200's 132

// Cache rows of a tile: 4096 elements of keys (and of values), 8 KB each in 16 bits; 64 rows below D = 64.
__host__ __device__ constexpr int tile_rows(int D) { return D >= 64 ? 4096 / D : 64; }

// Splits of one (row, KV head): enough blocks to fill the GPU at batch 1, never more than the tiles max_seq holds.
int64_t attention_splits(int64_t batch, int64_t kv_heads, int64_t head_dim, int64_t max_seq) {
  const int64_t tiles = ceil_div(max_seq, tile_rows((int)head_dim));
  return std::max<int64_t>(1, std::min(tiles, ceil_div(kTargetBlocks, batch * kv_heads)));
}

// Split s's tiles are [first_tile(s), first_tile(s + 1)): near-equal runs; with fewer tiles than splits, one each.
__device__ __forceinline__ int first_tile(int split, int tiles, int splits) {
  return (int)((int64_t)split * tiles / splits);
}

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
  int kv_heads, max_seq, splits;
  int group;  // G, for the merge (a kernel a head size, not a head size and group)
  float scale;
  float* partial;  // [B, KV, splits, G, D + 2]: P V, then max and sum of each split
  void* out;       // [B, N D]
  int32_t* counters;  // [B, KV] zeros, left zero: the splits that have finished; null: the combine launch merges
};

// Head g (of its group) of (h, b): the busy splits' partial softmaxes merged into out, by the block's threads.
// Each split's weight is exp(its max - the overall max); the sum of the weighted sums divides. Partials are read
// through L2 (__ldcg): other blocks wrote them.
template <typename T, int D>
__device__ void merge_splits(const AttentionArgs& a, int b, int h, int g, int tiles, float* max_s, float* sum_s,
                             float* weight_s) {
  const int G = a.group, splits = a.splits;
  const float* partial = a.partial + (((int64_t)b * a.kv_heads + h) * splits * G + g) * (D + 2);
  const int64_t step = (int64_t)G * (D + 2);  // from one split to the next
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {  // an idle split's workspace is stale: not read
    const bool busy = first_tile(s + 1, tiles, splits) > first_tile(s, tiles, splits);
    max_s[s] = busy ? __ldcg(partial + s * step + D) : -INFINITY;
    sum_s[s] = busy ? __ldcg(partial + s * step + D + 1) : 0.f;
  }
  __syncthreads();
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, max_s[s]);
  for (int s = threadIdx.x; s < splits; s += blockDim.x)
    weight_s[s] = max_s[s] == -INFINITY ? 0.f : __expf(max_s[s] - m);
  __syncthreads();
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += sum_s[s] * weight_s[s];
  T* out = static_cast<T*>(a.out) + (((int64_t)b * a.kv_heads + h) * G + g) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s)
      if (weight_s[s] != 0.f) acc += __ldcg(partial + s * step + d) * weight_s[s];
    out[d] = from_float<T>(acc / total);
  }
  __syncthreads();  // max_s, sum_s and weight_s free for the next head
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttentionArgs a) {
  constexpr int R = tile_rows(D), kPieces = R * D / 8;  // 16-byte pieces of a tile
  constexpr int E = D >= kWarp ? D / kWarp : 1;          // dims a lane holds in the score loop
  constexpr int kRowLanes = D / E, kRowsAtOnce = kWarp / kRowLanes;
  constexpr int kDims = D < kAttnThreads ? 1 : D / kAttnThreads;  // P V: dims a thread sums
  constexpr int kGroups = D < kAttnThreads ? kAttnThreads / D : 1;  // P V: thread groups splitting the rows
  constexpr int kScoreRow = kGroups > 1 ? kAttnThreads : R;  // p_s also holds the groups' sums at the end
  __shared__ alignas(16) T k_s[2][R][D];
  __shared__ alignas(16) T v_s[2][R][D];
  __shared__ alignas(16) T q_s[G][D];
  __shared__ T new_k[D], new_v[D];
  __shared__ float p_s[G][kScoreRow];
  __shared__ float max_s[G], sum_s[G], alpha_s[G];

  wait_for_producer();       // q, k and v come from the launch before
  allow_dependent_launch();  // the next launch (the merge, or the o projection) may start; it waits for this one
  const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = a.splits;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int position = a.seqlens_k[b], length = min(position + 1, a.max_seq);  // no row past the buffer
  const int tiles = length > 0 ? (length + R - 1) / R : 0;
  const int first = first_tile(split, tiles, splits), end = first_tile(split + 1, tiles, splits);
  T* out = static_cast<T*>(a.out) + ((int64_t)b * a.kv_heads + h) * G * D;
  if (first == end) {
    if (tiles == 0 && split == 0)  // an empty row (no token yet): zeros, not what the buffer held
      for (int i = tid; i < G * D; i += kAttnThreads) out[i] = from_float<T>(0.f);
    return;
  }
  const int64_t cache_head = ((int64_t)b * a.kv_heads + h) * a.max_seq;
  T* k_cache = static_cast<T*>(a.k_cache) + cache_head * D;
  T* v_cache = static_cast<T*>(a.v_cache) + cache_head * D;
  auto load_tile = [&](int tile, int stage) {  // rows past the length zero-filled
    for (int i = tid; i < kPieces; i += kAttnThreads) {
      const int r = i / (D / 8), c = i % (D / 8) * 8, row = tile * R + r;
      const int64_t at = (int64_t)(row < length ? row : 0) * D + c;
      cp_async_16(&k_s[stage][r][c], k_cache + at, row < length);
      cp_async_16(&v_s[stage][r][c], v_cache + at, row < length);
    }
    cp_async_commit();
  };
  load_tile(first, 0);

  const T* cos = static_cast<const T*>(a.cos) + (int64_t)position * a.rotary_half;
  const T* sin = static_cast<const T*>(a.sin) + (int64_t)position * a.rotary_half;
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + (int64_t)h * G * D;
  for (int i = tid; i < G * D; i += kAttnThreads)  // rotated, rounded as stored
    q_s[i / D][i % D] = from_float<T>(rotated(q + (i / D) * D, i % D, cos, sin, a.rotary_half));
  const int new_tile = position / R;
  const bool appends = position < a.max_seq && new_tile >= first && new_tile < end;
  if (appends) {  // this block's tiles hold the new token: into the cache, and into its tile below
    const T* k = static_cast<const T*>(a.k) + b * a.kv_stride + (int64_t)h * D;
    const T* v = static_cast<const T*>(a.v) + b * a.kv_stride + (int64_t)h * D;
    for (int d = tid; d < D; d += kAttnThreads) {
      new_k[d] = from_float<T>(rotated(k, d, cos, sin, a.rotary_half));
      new_v[d] = v[d];
      k_cache[(int64_t)position * D + d] = new_k[d];
      v_cache[(int64_t)position * D + d] = new_v[d];
    }
  }
  if (tid < G) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.f;
  }

  const int group = tid / (D / kDims), d0 = tid % (D / kDims) * kDims;
  float acc[G][kDims] = {};
  for (int tile = first; tile < end; ++tile) {
    const int stage = (tile - first) & 1, start = tile * R, rows = min(R, length - start);
    if (tile + 1 < end) {  // the next tile streams in while this one is worked on
      load_tile(tile + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // the tile, q_s and the new row visible to the whole block
    if (appends && tile == new_tile) {  // the cache row was read before (or while) it was written
      for (int d = tid; d < D; d += kAttnThreads) {
        k_s[stage][position - start][d] = new_k[d];
        v_s[stage][position - start][d] = new_v[d];
      }
      __syncthreads();
    }
    // Scores: kRowLanes lanes a row (a warp, or half of one for D = 16), E dims a lane, for the G heads.
    for (int r0 = warp * kRowsAtOnce; r0 < rows; r0 += kAttnWarps * kRowsAtOnce) {
      const int r = r0 + lane / kRowLanes, row_lane = lane % kRowLanes;  // r < R; rows past `rows` are zeros
      float key[E];
      load_row<T, E>(&k_s[stage][r][row_lane * E], key);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float query[E];
        load_row<T, E>(&q_s[g][row_lane * E], query);
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s += query[e] * key[e];
#pragma unroll
        for (int offset = kRowLanes / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (row_lane == 0 && r < rows) p_s[g][r] = s * a.scale;
      }
    }
    __syncthreads();
    // Online softmax: a warp a head; the running max and sum, and the factor the sums so far are rescaled by.
    for (int g = warp; g < G; g += kAttnWarps) {
      const float before = max_s[g];
      float m = before;
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
        const float alpha = __expf(before - m);  // 0 at the first tile (before = -inf)
        alpha_s[g] = alpha;
        sum_s[g] = sum_s[g] * alpha + sum;
        max_s[g] = m;
      }
    }
    __syncthreads();
    // P V: a thread a dim (D < 128: the rows split among kGroups groups), for the G heads.
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < kDims; ++j) acc[g][j] *= alpha_s[g];
    for (int r = group; r < rows; r += kGroups) {
#pragma unroll
      for (int j = 0; j < kDims; ++j) {
        const float value = to_float(v_s[stage][r][d0 + j]);
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g][j] += p_s[g][r] * value;
      }
    }
    __syncthreads();  // p_s and this stage free for the next tile
  }
  const bool writes = group == 0;  // kGroups > 1: group 0's threads hold the sums (the others stay for the barriers)
  if (kGroups > 1) {  // the groups' sums, added in a fixed order
    float* sums = &p_s[0][0];  // [kGroups][G][D]
#pragma unroll
    for (int g = 0; g < G; ++g) sums[(group * G + g) * D + d0] = acc[g][0];
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) {
      acc[g][0] = 0.f;
      for (int other = 0; other < kGroups; ++other) acc[g][0] += sums[(other * G + g) * D + d0];
    }
  }
  if (min(tiles, splits) == 1) {  // the only split with tiles: the output itself
    if (writes)
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int j = 0; j < kDims; ++j) out[g * D + d0 + j] = from_float<T>(acc[g][j] / sum_s[g]);
    return;
  }
  float* partial = a.partial + ((((int64_t)b * a.kv_heads + h) * splits + split) * G) * (D + 2);
  if (writes)
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < kDims; ++j) partial[g * (D + 2) + d0 + j] = acc[g][j];
      if (tid == 0) {
        partial[g * (D + 2) + D] = max_s[g];
        partial[g * (D + 2) + D + 1] = sum_s[g];
      }
    }
  if (!a.counters) return;  // the combine launch merges
  // The last busy split to finish merges: every thread's writes are made visible device-wide before thread 0
  // counts this split (the CUDA samples' threadFenceReduction), and the merge reads after the count.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int32_t* count = a.counters + (int64_t)b * a.kv_heads + h;
    last = atomicAdd(count, 1) == min(tiles, splits) - 1;
    if (last) *count = 0;  // every busy split has counted: zero for the next call
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  static_assert(sizeof(k_s) >= 3 * kTargetBlocks * sizeof(float), "the merge's scratch fits in the key tiles");
  float* merge_s = reinterpret_cast<float*>(&k_s[0][0][0]);  // a split's max, sum and weight: the tiles are done
#pragma unroll 1
  for (int g = 0; g < G; ++g)
    merge_splits<T, D>(a, b, h, g, tiles, merge_s, merge_s + kTargetBlocks, merge_s + 2 * kTargetBlocks);
}

// Without counters: merges the splits' partial softmaxes of head n of row b, block (n, b).
template <typename T, int D>
__global__ void __launch_bounds__(D < kAttnThreads ? D : kAttnThreads) combine_kernel(AttentionArgs a) {
  __shared__ float merge_s[3][kTargetBlocks];  // a split's max, sum and weight
  allow_dependent_launch();  // the next launch (the o projection) may start: it waits for this one to end
  wait_for_producer();        // the partials, and the length, as the attention launch left them
  const int n = blockIdx.x, b = blockIdx.y;
  const int length = min(a.seqlens_k[b] + 1, a.max_seq);
  const int tiles = length > 0 ? (length + tile_rows(D) - 1) / tile_rows(D) : 0;
  if (min(tiles, a.splits) <= 1) return;  // one split wrote the output (or the row is empty)
  merge_splits<T, D>(a, b, n / a.group, n % a.group, tiles, merge_s[0], merge_s[1], merge_s[2]);
}

template <typename T, int D, int G>
void launch_attention(const AttentionArgs& a, int batch, cudaStream_t s) {
  launch_programmatic(true, decode_attention_kernel<T, D, G>, dim3(a.kv_heads, batch, a.splits), dim3(kAttnThreads), 0,
                      s, a);
  if (a.splits > 1 && !a.counters)
    launch_programmatic(true, combine_kernel<T, D>, dim3(a.kv_heads * G, batch),
                        dim3(D < kAttnThreads ? D : kAttnThreads), 0, s, a);
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

extern "C" size_t moe_compile_decode_attention_workspace_size(int64_t batch, int64_t num_heads, int64_t kv_heads,
                                                              int64_t head_dim, int64_t max_seq) {
  if (batch <= 0 || kv_heads <= 0 || head_dim <= 0 || max_seq <= 0) return 0;
  const int64_t splits = moe::attention_splits(batch, kv_heads, head_dim, max_seq);
  return splits > 1 ? (size_t)(batch * num_heads * splits * (head_dim + 2)) * sizeof(float) : 0;
}

extern "C" int moe_compile_decode_attention(const void* query, const void* key, const void* value, int64_t q_stride,
                                            int64_t kv_stride, const void* past_key, const void* past_value,
                                            void* present_key, void* present_value, const int32_t* seqlens_k,
                                            const void* cos_cache, const void* sin_cache, int64_t rotary_half,
                                            int64_t batch, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                            int64_t max_seq, float scale, int32_t dtype, void* out, void* workspace,
                                            size_t workspace_bytes, int32_t* counters, void* cuda_stream) {
  if (batch < 0 || max_seq <= 0 || max_seq > INT32_MAX / 2 || rotary_half < 0 || 2 * rotary_half > head_dim ||
      !moe_compile_decode_attention_supported(num_heads, kv_heads, head_dim) ||
      (dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16))
    return MOE_ERR_INVALID_ARGUMENT;
  if (batch == 0) return MOE_OK;
  if (workspace_bytes < moe_compile_decode_attention_workspace_size(batch, num_heads, kv_heads, head_dim, max_seq))
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
                       (int)moe::attention_splits(batch, kv_heads, head_dim, max_seq), (int)(num_heads / kv_heads),
                       scale, static_cast<float*>(workspace), out, counters};
  const bool launched = dtype == MOE_DTYPE_F16 ? moe::launch_dims<__half>(a, (int)batch, (int)head_dim, a.group, s)
                                               : moe::launch_dims<__nv_bfloat16>(a, (int)batch, (int)head_dim, a.group, s);
  if (!launched) return MOE_ERR_INVALID_ARGUMENT;
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}

extern "C" int moe_compile_attention_counters(int64_t count, void* cuda_stream, int32_t** out) {
  if (!out || count <= 0) return MOE_ERR_INVALID_ARGUMENT;
  *out = nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &capture) != cudaSuccess) return MOE_ERR_CUDA;
  if (capture != cudaStreamCaptureStatusNone) return MOE_OK;  // allocating would break the capture: *out stays NULL
  if (cudaMalloc(out, (size_t)count * sizeof(int32_t)) != cudaSuccess) return MOE_ERR_CUDA;
  // on the caller's stream (ONNX Runtime's do not wait for the legacy default stream): zeros before the first use
  if (cudaMemsetAsync(*out, 0, (size_t)count * sizeof(int32_t), s) != cudaSuccess) {
    cudaFree(*out);
    *out = nullptr;
    return MOE_ERR_CUDA;
  }
  return MOE_OK;
}

extern "C" void moe_compile_free_attention_counters(int32_t* counters) {
  if (counters) cudaFree(counters);
}
