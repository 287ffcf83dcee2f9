// The sampler's candidates: the k <= 64 largest of each float32 row (the logits over a vocabulary), best first, ties
// to the lower index (ONNX TopK's order), and the row's argmax (ONNX ArgMax's first maximum) = the first of them.
// ONNX Runtime 1.31's CUDA TopK and ArgMax take five launches, 34 us of a decode step on A2.7B's 151936 logits; these
// two take 18 (H200, each kernel's own time: docs/BENCHMARKS.md, seventeenth run). Every SM takes a slice of the row:
//
//   slices   grid (S, rows), S = ceil(n / slice) <= kMaxSlices: each warp keeps its entries' best 64 in registers,
//            the block merges its warps' lists -> [rows, S, 64] (value, index) in the workspace
//   merge    grid (rows), a programmatic dependent of the slices: each warp merges up to kListsPerWarp of the S lists,
//            the block its warps' lists -> values/indices [rows, k], argmax [rows]
//
// A warp's list is 64 entries, 2 a lane (entry i = 32 j + lane in register j), kept sorted by bitonic networks of
// shuffles. A batch of 64 new entries (or a sorted list) joins in one step: list A best first, B worst first, the
// better of A_i and B_i at each i is the best 64 of both as a bitonic sequence, which 6 steps sort. A batch or list
// none of whose entries beats A's last is skipped (a warp vote): after the first few batches most are.
// NaN ranks above every number, as in torch.topk, so that a NaN row shows in the candidates.
#include "common.cuh"
#include "kernels.h"

namespace moe {
namespace {

constexpr int kList = 64;            // entries a list: 2 a lane
constexpr int kSliceWarps = 8;       // warps of a slices block
constexpr int kMinSlice = 1024;      // entries a slices block takes at least (2 batches a warp)
constexpr int kMaxSlices = 256;      // lists a row has at most
constexpr int kMergeWarps = 32;      // warps of the merge block
constexpr int kListsPerWarp = kMaxSlices / kMergeWarps;

struct Entry {
  float v;
  int i;
};

// a ranks before b: NaN first (the lower index among NaNs), then larger values, ties to the lower index.
__device__ __forceinline__ bool before(Entry a, Entry b) {
  const bool a_nan = a.v != a.v, b_nan = b.v != b.v;
  if (a_nan || b_nan) return a_nan && (!b_nan || a.i < b.i);
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// What ranks after every entry of a row (-inf at the lowest index still ranks before it): pads past the row's end.
__device__ __forceinline__ Entry last_entry() { return {__int_as_float(0xff800000), INT32_MAX}; }

__device__ __forceinline__ Entry shfl_xor(Entry e, int mask) {
  return {__shfl_xor_sync(0xffffffffu, e.v, mask), __shfl_xor_sync(0xffffffffu, e.i, mask)};
}

// One compare-exchange step at distance d over the list e: entry p keeps the better of itself and entry p ^ d where
// keep_better(p) holds, else the worse.
template <typename KeepBetter>
__device__ __forceinline__ void exchange(Entry (&e)[2], int d, KeepBetter keep_better) {
  const int lane = threadIdx.x % kWarp;
  Entry partner[2];
  if (d == kWarp) {
    partner[0] = e[1], partner[1] = e[0];
  } else {
    partner[0] = shfl_xor(e[0], d), partner[1] = shfl_xor(e[1], d);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int p = j * kWarp + lane;
    const bool better = before(partner[j], e[j]);
    if (better == keep_better(p)) e[j] = partner[j];
  }
}

// Sorts the 64 entries best first (best_first) or worst first: a bitonic sorting network.
__device__ __forceinline__ void sort_list(Entry (&e)[2], bool best_first) {
#pragma unroll
  for (int size = 2; size <= kList; size <<= 1)
#pragma unroll
    for (int d = size >> 1; d > 0; d >>= 1)
      exchange(e, d, [&](int p) { return (((p & d) == 0) != ((p & size) != 0)) == best_first; });
}

// A bitonic list of 64 sorted best first.
__device__ __forceinline__ void merge_bitonic(Entry (&e)[2]) {
#pragma unroll
  for (int d = kList / 2; d > 0; d >>= 1) exchange(e, d, [&](int p) { return (p & d) == 0; });
}

// The list's last (worst) entry, in every lane.
__device__ __forceinline__ Entry worst(const Entry (&e)[2]) {
  return {__shfl_sync(0xffffffffu, e[1].v, kWarp - 1), __shfl_sync(0xffffffffu, e[1].i, kWarp - 1)};
}

// best (sorted best first) becomes the best 64 of best and other, given worst first (entry p of register j).
__device__ __forceinline__ void join(Entry (&best)[2], const Entry (&other_worst_first)[2]) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
    if (before(other_worst_first[j], best[j])) best[j] = other_worst_first[j];
  merge_bitonic(best);
}

// The warps' lists (each sorted best first) into warp 0's, in rounds of pairs through shared memory. Every thread of
// the block calls it.
template <int WARPS>
__device__ __forceinline__ void join_warps(Entry (&e)[2], Entry (*lists)[kList]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int stride = 1; stride < WARPS; stride *= 2) {
    if (warp % (2 * stride) == stride) lists[warp][lane] = e[0], lists[warp][kWarp + lane] = e[1];
    __syncthreads();  // a round's writers are warps no earlier round read from: one barrier a round
    if (warp % (2 * stride) == 0) {
      const Entry* other = lists[warp + stride];
      const Entry reversed[2] = {other[kList - 1 - lane], other[kWarp - 1 - lane]};  // worst first
      if (before(other[0], worst(e))) join(e, reversed);  // uniform over the warp: join shuffles
    }
  }
}

__global__ void __launch_bounds__(kSliceWarps* kWarp)
    top_k_slices_kernel(const float* __restrict__ x, int n, int slice, Entry* __restrict__ lists) {
  __shared__ Entry warp_lists[kSliceWarps][kList];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row = blockIdx.y;
  const int64_t start = (int64_t)blockIdx.x * slice, end = min((int64_t)n, start + slice);  // int64: no overflow at n
  const float* xr = x + (size_t)row * n;
  allow_dependent_launch();  // the merge launch may start; it waits for this one
  wait_for_producer();       // the logits are the launch before's output
  Entry e[2] = {last_entry(), last_entry()};
  for (int64_t base = start + warp * kList; base < end; base += kSliceWarps * kList) {
    Entry batch[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t i = base + j * kWarp + lane;
      batch[j] = i < end ? Entry{xr[i], (int)i} : last_entry();
    }
    const Entry bar = worst(e);
    if (!__any_sync(0xffffffffu, before(batch[0], bar) || before(batch[1], bar))) continue;
    sort_list(batch, false);
    join(e, batch);
  }
  join_warps<kSliceWarps>(e, warp_lists);
  if (warp != 0) return;
  Entry* out = lists + ((size_t)row * gridDim.x + blockIdx.x) * kList;
  out[lane] = e[0], out[kWarp + lane] = e[1];
}

__global__ void __launch_bounds__(kMergeWarps* kWarp)
    top_k_merge_kernel(const Entry* __restrict__ lists, int slices, int k, float* __restrict__ values,
                       int64_t* __restrict__ indices, int64_t* __restrict__ argmax) {
  __shared__ Entry warp_lists[kMergeWarps][kList];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, row = blockIdx.x;
  const Entry* rl = lists + (size_t)row * slices * kList;
  wait_for_producer();  // the lists are the slices launch's output
  // every list of this warp in flight at once: one round trip, then the joins
  Entry mine[kListsPerWarp][2];
#pragma unroll
  for (int l = 0; l < kListsPerWarp; ++l) {
    const int s = warp + l * kMergeWarps;
    // worst first: entry p of the list is entry 63 - p of the slice's
    mine[l][0] = s < slices ? rl[(size_t)s * kList + kList - 1 - lane] : last_entry();
    mine[l][1] = s < slices ? rl[(size_t)s * kList + kWarp - 1 - lane] : last_entry();
  }
  Entry e[2] = {last_entry(), last_entry()};
#pragma unroll
  for (int l = 0; l < kListsPerWarp; ++l) {
    const Entry best_of_list = {__shfl_sync(0xffffffffu, mine[l][1].v, kWarp - 1),
                                __shfl_sync(0xffffffffu, mine[l][1].i, kWarp - 1)};
    if (before(best_of_list, worst(e))) join(e, mine[l]);
  }
  join_warps<kMergeWarps>(e, warp_lists);
  if (warp != 0) return;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int p = j * kWarp + lane;
    if (p < k) {
      values[(size_t)row * k + p] = e[j].v;
      indices[(size_t)row * k + p] = e[j].i;
    }
  }
  if (argmax && lane == 0) argmax[row] = e[0].i;
}

// Entries a slices block takes: at least kMinSlice, and few enough blocks a row for the merge's warps.
int64_t slice_of(int64_t n) {
  const int64_t slice = ceil_div(n, kMaxSlices);
  return slice < kMinSlice ? kMinSlice : ceil_div(slice, kList) * kList;
}

}  // namespace
}  // namespace moe

extern "C" size_t moe_compile_top_k_workspace_size(int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return 0;
  return (size_t)rows * moe::ceil_div(n, moe::slice_of(n)) * moe::kList * sizeof(moe::Entry);
}

extern "C" int moe_compile_top_k(const float* x, int64_t rows, int64_t n, int64_t k, float* values, int64_t* indices,
                                 int64_t* argmax, void* workspace, size_t workspace_bytes, void* cuda_stream) {
  // n: int32 indices, each below the padding's INT32_MAX
  if (rows < 0 || rows > 65535 || n < 1 || n > INT32_MAX || k < 1 || k > moe::kList || k > n)
    return MOE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return MOE_OK;
  if (!x || !values || !indices || !workspace || workspace_bytes < moe_compile_top_k_workspace_size(rows, n))
    return MOE_ERR_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  const int slice = (int)moe::slice_of(n), slices = (int)moe::ceil_div(n, slice);
  auto* lists = static_cast<moe::Entry*>(workspace);
  moe::launch_programmatic(true, moe::top_k_slices_kernel, dim3(slices, (unsigned)rows),
                           dim3(moe::kSliceWarps * moe::kWarp), 0, s, x, (int)n, slice, lists);
  moe::launch_programmatic(true, moe::top_k_merge_kernel, dim3((unsigned)rows), dim3(moe::kMergeWarps * moe::kWarp), 0,
                           s, static_cast<const moe::Entry*>(lists), slices, (int)k, values, indices, argmax);
  return cudaGetLastError() == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
