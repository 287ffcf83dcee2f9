// Routing kernels: one warp per token (routing.cuh), and the decode variant that also groups the
// few entries by expert in the same block.
#include "kernels.h"
#include "permute.cuh"
#include "routing.cuh"

namespace moe {

constexpr int kRouteWarps = 4;

__global__ void route_kernel(Problem p, const float* logits, const float* bias, int32_t* ids,
                             float* w) {
  extern __shared__ float scratch[];
  const int warp = threadIdx.x / kWarp;
  const int t = blockIdx.x * kRouteWarps + warp;
  if (t >= p.T) return;
  float* sel = scratch + warp * 2 * p.E;
  int id;
  float weight;
  route_token_warp(logits + (size_t)t * p.E, bias, p.routing, p.E, sel, sel + p.E, id, weight);
  if (threadIdx.x % kWarp < p.K) {
    ids[(size_t)t * p.K + threadIdx.x % kWarp] = id;
    w[(size_t)t * p.K + threadIdx.x % kWarp] = weight;
  }
}

void launch_route(const Problem& p, const float* logits, const float* bias, int32_t* ids,
                  float* w, cudaStream_t s) {
  const size_t smem = sizeof(float) * 2 * p.E * kRouteWarps;
  route_kernel<<<ceil_div(p.T, kRouteWarps), kRouteWarps * kWarp, smem, s>>>(p, logits, bias, ids, w);
}

// T <= kDecodeMaxTokens: route, count, scan, place and write the tile table in one launch, since
// at decode every extra launch costs about as much as the work.
__global__ void route_permute_small_kernel(Problem p, const float* logits, const float* bias,
                                           Workspace ws, int tile_m) {
  extern __shared__ float scratch[];
  int* ids = reinterpret_cast<int*>(scratch);  // [P]
  int* counts = ids + p.P;                     // [E]
  int* tiles = counts + p.E;                   // [E]
  float* sel = reinterpret_cast<float*>(tiles + p.E);
  const int warp = threadIdx.x / kWarp;
  float* my_sel = sel + warp * 2 * p.E;
  for (int t = warp; t < p.T; t += blockDim.x / kWarp) {
    int id;
    float weight;
    route_token_warp(logits + (size_t)t * p.E, bias, p.routing, p.E, my_sel, my_sel + p.E, id, weight);
    if (threadIdx.x % kWarp < p.K) {
      ws.topk_ids[(size_t)t * p.K + threadIdx.x % kWarp] = id;
      ws.topk_w[(size_t)t * p.K + threadIdx.x % kWarp] = weight;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.P; i += blockDim.x) ids[i] = ws.topk_ids[i];
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) counts[e] = count_matches(ids, p.P, e);
  __syncthreads();
  build_tile_table(counts, tiles, p.E, p.P, tile_m, ws.expert_offsets, ws.tile_expert,
                   ws.tile_row, ws.num_tiles);
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x)
    place_entries(ids, p.P, 0, e, counts[e], ws.perm_entry, ws.entry_pos);
}

void launch_route_permute_small(const Problem& p, const float* logits, const float* bias,
                                const Workspace& ws, int tile_m, cudaStream_t s) {
  const int threads = kRouteWarps * kWarp;
  const size_t smem = sizeof(int) * (p.P + 2 * p.E) + sizeof(float) * 2 * p.E * kRouteWarps;
  route_permute_small_kernel<<<1, threads, smem, s>>>(p, logits, bias, ws, tile_m);
}

}  // namespace moe
