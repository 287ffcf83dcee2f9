// Host-side launchers of the individual kernels, shared by launcher.cu. Internal: the public
// contract is fused_moe.h.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "fused_moe.h"

namespace moe {

constexpr int kDecodeMaxTokens = 16;  // the decode kernels handle up to this many tokens; 16-bit weights
                                      // take them that far by default (tensor-core GEMV, launcher.cu)
constexpr int kFmaDecodeTokens = 4;   // fp32 (FMA GEMV) takes them up to this by default: measured on
                                      // the H100, the grouped GEMM streams weights faster from T=8 on
constexpr int kSharedFmaTokens = 8;   // the FMA GEMV streams a shared expert up to this many tokens
constexpr int kMaxExperts = 1024;    // moe_shape.num_experts bound (fused_moe.h)
constexpr int kPermuteChunk = 256;    // routing entries per block in the prefill permutation

struct Problem {
  int T, H, I, E, K;
  int P;  // T*K routed (token, expert) entries
  moe_dtype dtype;
  moe_routing routing;
  bool gate_up_interleaved;  // moe_gate_up_layout
};

// Row of gate_up_proj[e] holding gate (up = 0) or up (up = 1) output column j.
__host__ __device__ inline int gate_up_row(const Problem& p, int j, int up) {
  return p.gate_up_interleaved ? 2 * j + up : j + up * p.I;
}

// Views into the caller's workspace. Permuted row p (grouped by expert) holds routing entry
// perm_entry[p] = t*K + k; entry_pos is the inverse map.
struct Workspace {
  int32_t* topk_ids;        // [P]
  float* topk_w;            // [P]
  int32_t* chunk_counts;    // [ceil(P/kPermuteChunk) * E]
  int32_t* expert_offsets;  // [E+1] first permuted row of each expert
  int32_t* tile_expert;     // [max_tiles] expert of each GEMM row tile
  int32_t* tile_row;        // [max_tiles] first permuted row of each tile
  int32_t* num_tiles;       // [1]
  int32_t* perm_entry;      // [P]
  int32_t* entry_pos;       // [P]
  void* act;                // [P, I] silu(gate)*up, dtype
  void* y;                  // [P, H] unweighted expert outputs, dtype (prefill only)
};

// The shared expert as the GEMV kernels see it (fused_moe.h: moe_shared_expert); gate_up null =
// none. Beyond launcher.cu's shared_stream_tokens it runs as a one-expert problem of its own.
struct Shared {
  const void* gate_up;       // [2I, H]
  const void* down;          // [H, I]
  const float* gate_logits;  // [T] or null (weight 1)
  int I;
  bool interleaved;
  void* act;                 // [T, I] silu(gate)*up, dtype (workspace)
  // quantized (beside quantized routed experts, at their bits and block): gate_up and down hold codes
  const void* gate_up_scales = nullptr;  // [2I, H/block]
  const void* down_scales = nullptr;     // [H, I/block]
};

__host__ __device__ inline int shared_gate_up_row(const Shared& s, int j, int up) {
  return s.interleaved ? 2 * j + up : j + up * s.I;
}

// Block-quantized routed experts (fused_moe.h: moe_quantized_experts): codes and scales of both.
struct QuantWeights {
  const void* gate_up;
  const void* gate_up_scales;
  const void* down;
  const void* down_scales;
  int bits;
  int block;
};

int max_tiles(const Problem& p, int tile_m);
int gemm_tile_m(const Problem& p);

void launch_route(const Problem& p, const float* logits, const float* bias, int32_t* ids,
                  float* w, cudaStream_t s);
// Decode: routing + permutation + tile table in one block.
void launch_route_permute_small(const Problem& p, const float* logits, const float* bias,
                                const Workspace& ws, int tile_m, cudaStream_t s);
// Prefill: permutation + tile table from ws.topk_ids, three launches, no host sync.
void launch_permute(const Problem& p, const Workspace& ws, int tile_m, cudaStream_t s);

// FMA GEMV (fp32 weights). shared.gate_up non-null: its columns are more tiles; routed = false: only those.
void launch_decode_gate_up(const Problem& p, const void* x, const void* w_gate_up, const Workspace& ws,
                           const Shared& shared, bool routed, cudaStream_t s);
// T = 1: routing and the tables of a one-token permutation inside the gate/up GEMV (one launch);
// the shared expert's gate/up columns stream while the routing warp works.
void launch_decode1_route_gate_up(const Problem& p, const void* x, const float* logits, const float* bias,
                                  const void* w_gate_up, const Workspace& ws, const Shared& shared, cudaStream_t s);
// shared.gate_up non-null: the shared expert's down rows join the same sums; routed = false: only
// those, added to out.
void launch_decode_down_sum(const Problem& p, const void* w_down, const Workspace& ws, const Shared& shared,
                            bool routed, void* out, cudaStream_t s);
// The same two steps on tensor cores (decode_mma.cu; fp16/bf16 only), same arguments.
void launch_mma_gate_up(const Problem& p, const void* x, const void* w_gate_up, const Workspace& ws,
                        const Shared& shared, bool routed, cudaStream_t s);
void launch_mma_down_sum(const Problem& p, const void* w_down, const Workspace& ws, const Shared& shared,
                         bool routed, void* out, cudaStream_t s);
// The router's output as moe_compile_forward takes it: logits [T, E] and the optional selection bias [E].
struct Route {
  const float* logits = nullptr;
  const float* bias = nullptr;
};

// The tensor-core steps reading quantized experts, dequantized in registers; shared.gate_up non-null: a
// quantized shared expert (Shared's scales) in the same launches. T = 1: both launches route the token themselves
// from `route` (no launch_route_permute_small before them; down starts before gate/up ends, sm_90+); otherwise
// `route` is not read.
void launch_mma_gate_up_quantized(const Problem& p, const void* x, const QuantWeights& w, const Workspace& ws,
                                  const Shared& shared, const Route& route, cudaStream_t s);
void launch_mma_down_sum_quantized(const Problem& p, const QuantWeights& w, const Workspace& ws, const Shared& shared,
                                   const Route& route, void* out, cudaStream_t s);
// out [rows, K] of dtype = (u - 2^(bits-1)) * scale from codes [rows, K*bits/8] and scales [rows, K/block].
void launch_dequantize(const void* codes, const void* scales, int64_t rows, int64_t K, int bits, int block,
                       moe_dtype dtype, void* out, cudaStream_t s);
// out[t] += g_t * y[t] (g_t = sigmoid(gate_logits[t]), or 1): the shared expert's term for T > 1.
void launch_add_shared(const Problem& p, const void* y, const float* gate_logits, void* out, cudaStream_t s);

void launch_gemm_gate_up(const Problem& p, const void* x, const void* w_gate_up,
                         const Workspace& ws, int tile_m, cudaStream_t s);
void launch_gemm_down(const Problem& p, const void* w_down, const Workspace& ws, int tile_m,
                      cudaStream_t s);
void launch_unpermute(const Problem& p, const Workspace& ws, void* out, cudaStream_t s);

}  // namespace moe
