// Prefill permutation: routing entries grouped by expert in three launches and no host sync.
//   count:  block c counts, per expert, the entries of its chunk      -> chunk_counts[c][e]
//   scan:   one block: per-expert totals, offsets, chunk bases, tile table
//   place:  block c writes its entries from its chunk base on (stable: token order kept)
#include "kernels.h"
#include "permute.cuh"

namespace moe {

__device__ __forceinline__ int load_chunk(const Problem& p, const int32_t* topk_ids, int* ids) {
  const int base = blockIdx.x * kPermuteChunk;
  const int n = min(kPermuteChunk, p.P - base);
  for (int i = threadIdx.x; i < n; i += blockDim.x) ids[i] = topk_ids[base + i];
  __syncthreads();
  return n;
}

__global__ void count_chunks_kernel(Problem p, Workspace ws) {
  __shared__ int ids[kPermuteChunk];
  const int n = load_chunk(p, ws.topk_ids, ids);
  for (int e = threadIdx.x; e < p.E; e += blockDim.x)
    ws.chunk_counts[(size_t)blockIdx.x * p.E + e] = count_matches(ids, n, e);
}

__global__ void scan_chunks_kernel(Problem p, Workspace ws, int num_chunks, int tile_m) {
  extern __shared__ int scan_smem[];
  int* counts = scan_smem;
  int* tiles = scan_smem + p.E;
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
    int run = 0;  // chunk_counts[c][e] becomes the rank of chunk c's first entry within expert e
    for (int c = 0; c < num_chunks; ++c) {
      int* cell = ws.chunk_counts + (size_t)c * p.E + e;
      int v = *cell;
      *cell = run;
      run += v;
    }
    counts[e] = run;
  }
  __syncthreads();
  build_tile_table(counts, tiles, p.E, p.P, tile_m, ws.expert_offsets, ws.tile_expert,
                   ws.tile_row, ws.num_tiles);
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x)
    for (int c = 0; c < num_chunks; ++c) ws.chunk_counts[(size_t)c * p.E + e] += counts[e];
}

__global__ void place_chunks_kernel(Problem p, Workspace ws) {
  __shared__ int ids[kPermuteChunk];
  const int n = load_chunk(p, ws.topk_ids, ids);
  for (int e = threadIdx.x; e < p.E; e += blockDim.x)
    place_entries(ids, n, blockIdx.x * kPermuteChunk, e,
                  ws.chunk_counts[(size_t)blockIdx.x * p.E + e], ws.perm_entry, ws.entry_pos);
}

void launch_permute(const Problem& p, const Workspace& ws, int tile_m, cudaStream_t s) {
  const int chunks = ceil_div(p.P, kPermuteChunk);
  count_chunks_kernel<<<chunks, 256, 0, s>>>(p, ws);
  scan_chunks_kernel<<<1, 1024, sizeof(int) * 2 * p.E, s>>>(p, ws, chunks, tile_m);
  place_chunks_kernel<<<chunks, 256, 0, s>>>(p, ws);
}

}  // namespace moe
