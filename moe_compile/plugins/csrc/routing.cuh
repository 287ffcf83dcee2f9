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

// A float as a key whose unsigned order is the float's order (-0 taken as +0, so that they tie as floats do).
__device__ __forceinline__ uint32_t ordered_key(float v) {
  const uint32_t u = __float_as_uint(v + 0.f);
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}
__device__ __forceinline__ float from_ordered_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? k & 0x7fffffffu : ~k);
}

// Larger value wins, equal values go to the lower index. Lanes enter with real values or
// (-inf, INT32_MAX), never NaN, so every lane ends with the same pair. Two warp-wide reductions (sm_80+) instead of
// five rounds of shuffles: A2.7B's four choices in a T = 1 launch beside streaming warps took 2.4 -> 1.7 µs
// (docs/FUSED_MOE.md).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
  const uint32_t key = ordered_key(v), top = __reduce_max_sync(0xffffffffu, key);
  i = (int)__reduce_min_sync(0xffffffffu, key == top ? (uint32_t)i : 0xffffffffu);
  v = from_ordered_key(top);
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

// sel and score: this warp's scratch, E floats each. Lane j < K ends with the j-th choice in (id, w); with
// weights = false, w is left as it is (a launch that needs only the experts skips the softmax's sum).
// The K choices are K rounds of a warp arg-max over each lane's best value not yet taken (a lane holds experts
// lane, lane + 32, ...): after a round only the winner's lane looks at its own values again, so a round is one
// warp arg-max and no pass over E, no shared-memory write and no __syncwarp. Selection treats a NaN as -inf (a
// choice is always one of the E experts); the weights keep it, so a NaN logit still reaches the output.
__device__ __forceinline__ void route_token_warp(const float* logits, const float* bias, const moe_routing& r,
                                                 int E, float* sel, float* score, int& id, float& w,
                                                 bool weights = true) {
  const int lane = threadIdx.x % kWarp;
  const bool sigmoid_mode = r.kind == MOE_ROUTING_SIGMOID_GROUP_TOPK;
  for (int e = lane; e < E; e += kWarp) {
    const float l = logits[e];
    if (sigmoid_mode) {
      const float s = 1.f / (1.f + expf(-l));
      score[e] = s;
      sel[e] = s + (bias ? bias[e] : 0.f);
    } else {
      sel[e] = l;
    }
  }
  __syncwarp();  // mask_weak_groups and the sigmoid weights read other lanes' values
  ROUTE_STAMP(6);
  if (sigmoid_mode && r.n_group > 1) mask_weak_groups(sel, E, r.n_group, r.topk_group);

  uint32_t taken = 0;  // bit m: expert lane + 32 m is chosen (E <= 1024)
  float v;             // the lane's best value not taken, and its expert
  int i;
  const auto own_best = [&] {
    v = -INFINITY, i = INT32_MAX;
#pragma unroll 4
    for (int m = 0, e = lane; e < E; ++m, e += kWarp) {
      const float c = sel[e] == sel[e] ? sel[e] : -INFINITY;
      if (!((taken >> m) & 1u) && (c > v || (c == v && e < i))) v = c, i = e;
    }
  };
  own_best();
  float top = 0.f, my_v = 0.f;
  id = 0;
  for (int j = 0; j < r.top_k; ++j) {
    float wv = v;
    int wi = i;
    warp_argmax(wv, wi);  // K <= E: some lane always has one left
    if (j == 0) top = wv;
    if (lane == j) id = wi, my_v = wv;
    if (wi == i) {  // this lane's: take it, find the next
      taken |= 1u << (wi / kWarp);
      own_best();
    }
  }
  ROUTE_STAMP(7);
  if (!weights) return;
  if (sigmoid_mode) {
    w = lane < r.top_k ? score[id] : 0.f;
  } else {
    float s = 0.f;
    for (int e = lane; e < E; e += kWarp) s += expf(sel[e] - top);
    w = expf(my_v - top) / warp_sum(s);
  }
  if (r.renormalize) {
    const float total = warp_sum(lane < r.top_k ? w : 0.f);
    w /= sigmoid_mode ? total + 1e-20f : total;
  }
  w *= r.routed_scaling_factor;
}

// One token routed inside a decode kernel (T = 1: no routing launch of its own): warp 0 of each block routes it into
// shared memory.
struct TokenRoute {
  int pick[32];  // the k-th choice's expert
  float pick_w[32];
  int by_row[32];  // experts in permuted-row order (ascending id, as the permutation): route_one_token_rows
};

// Warp 0 of the block; scratch: 2E floats of shared memory. weights = false: r.pick_w is not written.
__device__ __forceinline__ void route_one_token_warp(const Problem& p, const float* logits, const float* bias,
                                                     float* scratch, TokenRoute& r, bool weights = true) {
  const int lane = threadIdx.x % kWarp;
  int e;
  float w = 0.f;
  route_token_warp(logits, bias, p.routing, p.E, scratch, scratch + p.E, e, w, weights);
  if (lane < p.K) r.pick[lane] = e, r.pick_w[lane] = w;
}

// The same warp after route_one_token_warp: the choices in row order, and (write) the routing tables that a launch
// which does not route reads.
__device__ __forceinline__ void route_one_token_rows(const Problem& p, const Workspace& ws, TokenRoute& r, bool write) {
  const int lane = threadIdx.x % kWarp;
  const int e = lane < p.K ? r.pick[lane] : 0;
  int row = 0;  // the K choices are distinct experts: row = the choices below e
  for (int k = 0; k < p.K; ++k) row += __shfl_sync(0xffffffffu, e, k) < e;
  if (lane < p.K) {
    r.by_row[row] = e;
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
