// Routing of one token by one warp: router logits [E] -> K expert ids and weights.
// Selection runs on exact fp32 comparisons (softmax mode selects on the logits themselves, which
// orders the same as the probabilities), ties going to the lower expert index, so a reference
// that sorts stably makes the same choice.
#pragma once
#include <math.h>

#include "common.cuh"
#include "fused_moe.h"
#include "kernels.h"

// Phase stamps of the routing warp (decode_mma.cu: phase); nothing elsewhere.
#ifndef ROUTE_STAMP
#define ROUTE_STAMP(i)
#endif

namespace moe {

// Larger value wins, equal values go to the lower index. Lanes enter with real values or
// (-inf, INT32_MAX), never NaN, so every lane ends with the same pair.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
}

// Arg-max over sel[0..n), then marks the winner taken with NaN (which never compares greater).
__device__ __forceinline__ int warp_take_max(float* sel, int n, float* value) {
  const int lane = threadIdx.x % kWarp;
  float v = -INFINITY;
  int i = INT32_MAX;
  for (int e = lane; e < n; e += kWarp) {
    float c = sel[e];
    if (c > v || (c == v && e < i)) { v = c; i = e; }
  }
  warp_argmax(v, i);
  __syncwarp();
  if (lane == 0) sel[i] = NAN;
  __syncwarp();
  *value = v;
  return i;
}

// Keeps the topk_group groups with the largest sum of their top-2 choices; masks the rest.
__device__ __forceinline__ void mask_weak_groups(float* choice, int E, int n_group, int topk_group) {
  const int lane = threadIdx.x % kWarp;
  const int gsize = E / n_group;
  float gscore = -INFINITY;
  if (lane < n_group) {
    float m1 = -INFINITY, m2 = -INFINITY;
    for (int e = lane * gsize; e < (lane + 1) * gsize; ++e) {
      float c = choice[e];
      if (c > m1) { m2 = m1; m1 = c; } else if (c > m2) { m2 = c; }
    }
    gscore = gsize > 1 ? m1 + m2 : m1;
  }
  uint32_t kept = 0;
  bool taken = lane >= n_group;
  for (int j = 0; j < topk_group; ++j) {
    float v = taken ? -INFINITY : gscore;
    int g = taken ? INT32_MAX : lane;
    warp_argmax(v, g);
    kept |= 1u << g;
    if (lane == g) taken = true;
  }
  for (int e = lane; e < E; e += kWarp)
    if (!((kept >> (e / gsize)) & 1u)) choice[e] = -INFINITY;
  __syncwarp();
}

// sel and score: this warp's scratch, E floats each. Lane j < K writes the j-th choice.
__device__ __forceinline__ void route_token_warp(const float* logits, const float* bias, const moe_routing& r,
                                 int E, float* sel, float* score, int32_t* ids_out,
                                 float* w_out) {
  const int lane = threadIdx.x % kWarp;
  const bool sigmoid_mode = r.kind == MOE_ROUTING_SIGMOID_GROUP_TOPK;
  float row_max = -INFINITY, denom = 1.f;
  for (int e = lane; e < E; e += kWarp) {
    float l = logits[e];
    if (sigmoid_mode) {
      float s = 1.f / (1.f + expf(-l));
      score[e] = s;
      sel[e] = s + (bias ? bias[e] : 0.f);
    } else {
      sel[e] = l;
      row_max = fmaxf(row_max, l);
    }
  }
  if (!sigmoid_mode) {
    for (int o = kWarp / 2; o > 0; o >>= 1)
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, o));
    float s = 0.f;
    for (int e = lane; e < E; e += kWarp) s += expf(logits[e] - row_max);
    denom = warp_sum(s);
  }
  __syncwarp();
  ROUTE_STAMP(6);
  if (sigmoid_mode && r.n_group > 1) mask_weak_groups(sel, E, r.n_group, r.topk_group);

  int my_id = 0;
  float my_w = 0.f;
  for (int j = 0; j < r.top_k; ++j) {
    float v;
    int e = warp_take_max(sel, E, &v);
    float w = sigmoid_mode ? score[e] : expf(v - row_max) / denom;
    if (lane == j) { my_id = e; my_w = w; }
  }
  ROUTE_STAMP(7);
  if (r.renormalize) {
    float total = warp_sum(lane < r.top_k ? my_w : 0.f);
    my_w /= sigmoid_mode ? total + 1e-20f : total;
  }
  my_w *= r.routed_scaling_factor;
  if (lane < r.top_k) { ids_out[lane] = my_id; w_out[lane] = my_w; }
}

// One token routed inside a decode kernel (T = 1: no routing launch of its own). Every block routes the token
// with its warp 0 into shared memory; one block of the grid also writes the tables the down kernels read.
struct TokenRoute {
  int32_t pick[32];  // the k-th choice's expert
  float pick_w[32];
  int by_row[32];    // experts in permuted-row order (ascending id, as the permutation)
  float w_by_row[32];  // their weights
};

// Warp 0 of the block; scratch: 2E floats of shared memory. `write`: this block writes the routing tables.
__device__ __forceinline__ void route_one_token_warp(const Problem& p, const float* logits, const float* bias,
                                                     const Workspace& ws, float* scratch, TokenRoute& r, bool write) {
  const int lane = threadIdx.x % kWarp;
  route_token_warp(logits, bias, p.routing, p.E, scratch, scratch + p.E, r.pick, r.pick_w);
  __syncwarp();
  if (lane < p.K) {
    const int e = r.pick[lane];
    int row = 0;
    for (int k = 0; k < p.K; ++k) row += r.pick[k] < e;  // the K choices are distinct experts
    r.by_row[row] = e;
    r.w_by_row[row] = r.pick_w[lane];
    if (write) {
      ws.topk_ids[lane] = e;
      ws.topk_w[lane] = r.pick_w[lane];
      ws.tile_expert[row] = e;
      ws.tile_row[row] = row;
      ws.perm_entry[row] = lane;
      ws.entry_pos[lane] = row;
    }
  }
}

// The whole writing block, after the __syncthreads that follows route_one_token_warp: each expert's first
// permuted row, and the tile count (one tile a chosen expert).
__device__ __forceinline__ void route_one_token_offsets(const Problem& p, const TokenRoute& r, const Workspace& ws) {
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) {
    int below = 0;
    for (int k = 0; k < p.K; ++k) below += r.pick[k] < e;
    ws.expert_offsets[e] = below;
  }
  if (threadIdx.x == 0) *ws.num_tiles = p.K;
}

}  // namespace moe
