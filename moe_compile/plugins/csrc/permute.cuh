// Device helpers for grouping routing entries by expert. Every step is a fixed-order scan (no
// atomics), so the permutation itself is deterministic: within an expert, entries keep token order.
#pragma once
#include "common.cuh"

namespace moe {

__device__ __forceinline__ int count_matches(const int32_t* ids, int n, int e) {
  int c = 0;
  for (int i = 0; i < n; ++i) c += ids[i] == e;
  return c;
}

// In-place exclusive scan of a[0..n) by one warp (lane-contiguous segments); returns the total.
__device__ __forceinline__ int warp_exclusive_scan(int* a, int n) {
  const int lane = threadIdx.x % kWarp;
  const int seg = (n + kWarp - 1) / kWarp;
  const int begin = min(lane * seg, n), end = min(begin + seg, n);
  int own = 0;
  for (int i = begin; i < end; ++i) own += a[i];
  int incl = own;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  int run = incl - own;
  for (int i = begin; i < end; ++i) {
    int v = a[i];
    a[i] = run;
    run += v;
  }
  return __shfl_sync(0xffffffffu, incl, kWarp - 1);
}

// counts[e] -> expert_offsets and the GEMM row-tile table (tile_m rows each). Block-wide;
// counts and tiles are shared scratch of E ints each; overwrites counts with the offsets.
__device__ __forceinline__ void build_tile_table(int* counts, int* tiles, int E, int P, int tile_m,
                                                 int32_t* expert_offsets, int32_t* tile_expert,
                                                 int32_t* tile_row, int32_t* num_tiles) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) tiles[e] = (counts[e] + tile_m - 1) / tile_m;
  __syncthreads();
  if (threadIdx.x < kWarp) {
    warp_exclusive_scan(counts, E);
    int total_tiles = warp_exclusive_scan(tiles, E);
    if (threadIdx.x == 0) { *num_tiles = total_tiles; expert_offsets[E] = P; }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int off = counts[e];
    const int end = e + 1 < E ? counts[e + 1] : P;
    expert_offsets[e] = off;
    for (int r = off, t = tiles[e]; r < end; r += tile_m, ++t) {
      tile_expert[t] = e;
      tile_row[t] = r;
    }
  }
}

// Places the entries ids[0..n) (global entry index base + i) of expert e from row pos on.
__device__ __forceinline__ void place_entries(const int32_t* ids, int n, int base, int e, int pos,
                                              int32_t* perm_entry, int32_t* entry_pos) {
  for (int i = 0; i < n; ++i) {
    if (ids[i] == e) {
      perm_entry[pos] = base + i;
      if (entry_pos) entry_pos[base + i] = pos;
      ++pos;
    }
  }
}

}  // namespace moe
