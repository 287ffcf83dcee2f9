// Decode path (T <= kDecodeMaxTokens): GEMV kernels that stream each selected expert's weights
// exactly once, whatever number of tokens chose it.
//   gate_up: block (expert tile, 8 output columns), warp = one gate row + its up row, all the
//            expert's tokens at once                                   -> act [P, I]
//   down+sum: block = 4 rows of H over every active expert; warps take (expert, 2 rows) items,
//            weight by the routing weight, sum per token in a fixed order -> out [T, H]
//   T = 1:   routing moves into gate_up (no launch of its own): every block routes the token with
//            one warp, block 0 writes the tables down+sum reads, and the grid (as many blocks as fit
//            on the GPU at once) streams (expert, column) items in a grid-stride loop.
#include "common.cuh"
#include "kernels.h"
#include "routing.cuh"

namespace moe {

constexpr int kDecodeWarps = 8;
constexpr int kCols = 1;      // gate_up: output columns per warp (measured: 2 halves the warps and
                              // lost 20-40% at T=1 on the H100)
constexpr int kDownRows = 4;  // down: rows of H per block
constexpr int kRowsPerItem = 2;  // down: rows of H per warp work item (shares each act load)

// 16-byte weight loads in flight per lane per row before the first use: at T=1 a whole 2048-wide
// row per warp in one round trip; fewer with more tokens so everything stays in registers.
template <int NMAX> __host__ __device__ constexpr int unroll() { return NMAX == 1 ? 8 : NMAX <= 8 ? 4 : 2; }

template <typename T, int NMAX>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode_gate_up_kernel(Problem p, const T* __restrict__ x, const T* __restrict__ w, Workspace ws) {
  constexpr int V = Vec<T>::kElems, U = unroll<NMAX>(), R = 2 * kCols;
  if ((int)blockIdx.x >= *ws.num_tiles) return;
  const int e = ws.tile_expert[blockIdx.x];
  const int row0 = ws.expert_offsets[e];
  const int n = ws.expert_offsets[e + 1] - row0;
  const int lane = threadIdx.x % kWarp;
  const int j0 = (blockIdx.y * kDecodeWarps + threadIdx.x / kWarp) * kCols;
  if (j0 >= p.I) return;  // I % 8 == 0, so j0 < I covers all kCols columns

  const T* xs[NMAX];
#pragma unroll
  for (int s = 0; s < NMAX; ++s) xs[s] = x + (size_t)(ws.perm_entry[row0 + min(s, n - 1)] / p.K) * p.H;
  const T* rows[R];  // gate rows of columns j0.., then their up rows
#pragma unroll
  for (int r = 0; r < R; ++r)
    rows[r] = w + ((size_t)e * 2 * p.I + gate_up_row(p, j0 + r % kCols, r >= kCols)) * p.H;

  float acc[R][NMAX];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int s = 0; s < NMAX; ++s) acc[r][s] = 0.f;
  for (int h0 = lane * V; h0 < p.H; h0 += kWarp * V * U) {
    Vec<T> wv[U][R];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[q][r].raw = make_uint4(0, 0, 0, 0);
        if (h < p.H) wv[q][r] = load_vec_stream(rows[r] + h);
      }
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      if (h >= p.H) break;
#pragma unroll
      for (int s = 0; s < NMAX; ++s) {
        if (s < n) {
          const Vec<T> xv = load_vec(xs[s] + h);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][s] += dot_vec(wv[q][r], xv);
        }
      }
    }
  }
  T* act = static_cast<T*>(ws.act);
#pragma unroll
  for (int s = 0; s < NMAX; ++s) {
    if (s < n) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float g = warp_sum(acc[c][s]), u = warp_sum(acc[kCols + c][s]);
        if (lane == 0) act[(size_t)(row0 + s) * p.I + j0 + c] = from_float<T>(silu_mul(g, u));
      }
    }
  }
}

// One warp: the gate and up rows of column j of expert e, dotted with x [H] -> act[row * I + j].
template <typename T>
__device__ __forceinline__ void gate_up_column(const Problem& p, const T* __restrict__ x, const T* __restrict__ w,
                                               int e, int j, int row, T* act) {
  constexpr int V = Vec<T>::kElems, U = unroll<1>();
  const int lane = threadIdx.x % kWarp;
  const T* gate = w + ((size_t)e * 2 * p.I + gate_up_row(p, j, 0)) * p.H;
  const T* up = w + ((size_t)e * 2 * p.I + gate_up_row(p, j, 1)) * p.H;
  float g = 0.f, u = 0.f;
  for (int h0 = lane * V; h0 < p.H; h0 += kWarp * V * U) {
    Vec<T> gv[U], uv[U];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      gv[q].raw = uv[q].raw = make_uint4(0, 0, 0, 0);
      if (h < p.H) { gv[q] = load_vec_stream(gate + h); uv[q] = load_vec_stream(up + h); }
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      if (h >= p.H) break;
      const Vec<T> xv = load_vec(x + h);
      g += dot_vec(gv[q], xv);
      u += dot_vec(uv[q], xv);
    }
  }
  g = warp_sum(g);
  u = warp_sum(u);
  if (lane == 0) act[(size_t)row * p.I + j] = from_float<T>(silu_mul(g, u));
}

template <typename T>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode1_route_gate_up_kernel(Problem p, const T* __restrict__ x, const float* __restrict__ logits,
                                 const float* __restrict__ bias, const T* __restrict__ w, Workspace ws) {
  extern __shared__ float route_scratch[];  // sel [E], score [E]
  __shared__ int32_t pick[32];              // the k-th choice's expert
  __shared__ float pick_w[32];
  __shared__ int by_row[32];                // experts in row order (ascending id, as the permutation)
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (warp == 0) {
    route_token_warp(logits, bias, p.routing, p.E, route_scratch, route_scratch + p.E, pick, pick_w);
    __syncwarp();
    if (lane < p.K) {
      const int e = pick[lane];
      int row = 0;
      for (int k = 0; k < p.K; ++k) row += pick[k] < e;  // the K choices are distinct experts
      by_row[row] = e;
      if (blockIdx.x == 0) {
        ws.topk_ids[lane] = e;
        ws.topk_w[lane] = pick_w[lane];
        ws.tile_expert[row] = e;
        ws.tile_row[row] = row;
        ws.perm_entry[row] = lane;
        ws.entry_pos[lane] = row;
      }
    }
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= p.E; e += blockDim.x) {
      int below = 0;
      for (int k = 0; k < p.K; ++k) below += pick[k] < e;
      ws.expert_offsets[e] = below;
    }
    if (threadIdx.x == 0) *ws.num_tiles = p.K;
  }
  T* act = static_cast<T*>(ws.act);
  const int items = p.K * p.I, stride = gridDim.x * kDecodeWarps;
  for (int item = blockIdx.x * kDecodeWarps + warp; item < items; item += stride) {
    const int row = item / p.I;
    gate_up_column(p, x, w, by_row[row], item % p.I, row, act);
  }
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode_down_sum_kernel(Problem p, const T* __restrict__ w, Workspace ws, T* __restrict__ out) {
  constexpr int V = Vec<T>::kElems, U = unroll<NMAX>(), R = kRowsPerItem;
  constexpr int kItemsPerTile = kDownRows / R;
  __shared__ float partial[kDecodeWarps][kDownRows][NMAX];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = threadIdx.x; i < kDecodeWarps * kDownRows * NMAX; i += blockDim.x)
    (&partial[0][0][0])[i] = 0.f;
  __syncthreads();

  const int h_base = blockIdx.x * kDownRows;
  const int items = *ws.num_tiles * kItemsPerTile;
  const T* act = static_cast<const T*>(ws.act);
  for (int item = warp; item < items; item += kDecodeWarps) {
    const int r0 = (item % kItemsPerTile) * R, h0 = h_base + r0;
    if (h0 >= p.H) continue;  // H % 8 == 0: the item's R rows are all in range
    const int e = ws.tile_expert[item / kItemsPerTile];
    const int row0 = ws.expert_offsets[e];
    const int n = ws.expert_offsets[e + 1] - row0;
    const T* wrow = w + ((size_t)e * p.H + h0) * p.I;
    float acc[R][NMAX];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int s = 0; s < NMAX; ++s) acc[r][s] = 0.f;
    for (int i0 = lane * V; i0 < p.I; i0 += kWarp * V * U) {
      Vec<T> wv[U][R];
#pragma unroll
      for (int q = 0; q < U; ++q) {
        const int i = i0 + q * kWarp * V;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          wv[q][r].raw = make_uint4(0, 0, 0, 0);
          if (i < p.I) wv[q][r] = load_vec_stream(wrow + (size_t)r * p.I + i);
        }
      }
#pragma unroll
      for (int q = 0; q < U; ++q) {
        const int i = i0 + q * kWarp * V;
        if (i >= p.I) break;
#pragma unroll
        for (int s = 0; s < NMAX; ++s) {
          if (s < n) {
            const Vec<T> av = load_vec(act + (size_t)(row0 + s) * p.I + i);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][s] += dot_vec(wv[q][r], av);
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < NMAX; ++s) {
      if (s < n) {
        const int entry = ws.perm_entry[row0 + s];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float v = warp_sum(acc[r][s]);
          if (lane == 0) partial[warp][r0 + r][entry / p.K] += ws.topk_w[entry] * v;
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kDownRows * p.T; i += blockDim.x) {
    const int r = i / p.T, t = i % p.T, h = h_base + r;
    if (h >= p.H) continue;
    float s = 0.f;
    for (int wp = 0; wp < kDecodeWarps; ++wp) s += partial[wp][r][t];  // fixed order
    out[(size_t)t * p.H + h] = from_float<T>(s);
  }
}

// Blocks of decode1_route_gate_up_kernel<T> that are resident at once on this GPU (asked once).
template <typename T>
int resident_blocks(size_t smem) {
  static int blocks = 0;
  if (!blocks) {
    int device = 0, sms = 0, per_sm = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode1_route_gate_up_kernel<T>, kDecodeWarps * kWarp, smem);
    blocks = sms * (per_sm > 0 ? per_sm : 1);
  }
  return blocks;
}

template <typename T>
void launch_decode1(const Problem& p, const void* x, const float* logits, const float* bias, const void* w_gate_up,
                    const Workspace& ws, cudaStream_t s) {
  const size_t smem = sizeof(float) * 2 * kMaxExperts;  // one occupancy figure for every E
  const int blocks = min(resident_blocks<T>(smem), (int)ceil_div(p.K * p.I, kDecodeWarps));
  decode1_route_gate_up_kernel<T><<<blocks, kDecodeWarps * kWarp, sizeof(float) * 2 * p.E, s>>>(
      p, static_cast<const T*>(x), logits, bias, static_cast<const T*>(w_gate_up), ws);
}

void launch_decode1_route_gate_up(const Problem& p, const void* x, const float* logits, const float* bias,
                                  const void* w_gate_up, const Workspace& ws, cudaStream_t s) {
  switch (p.dtype) {
    case MOE_DTYPE_F32: launch_decode1<float>(p, x, logits, bias, w_gate_up, ws, s); break;
    case MOE_DTYPE_F16: launch_decode1<__half>(p, x, logits, bias, w_gate_up, ws, s); break;
    case MOE_DTYPE_BF16: launch_decode1<__nv_bfloat16>(p, x, logits, bias, w_gate_up, ws, s); break;
  }
}

template <typename T, int NMAX>
void launch_decode(const Problem& p, const void* x, const void* w_gate_up, const void* w_down,
                   const Workspace& ws, void* out, cudaStream_t s, bool gate_up) {
  const int threads = kDecodeWarps * kWarp;
  if (gate_up) {
    const dim3 grid(min(p.E, p.P), ceil_div(p.I, kDecodeWarps * kCols));
    decode_gate_up_kernel<T, NMAX><<<grid, threads, 0, s>>>(p, static_cast<const T*>(x),
                                                            static_cast<const T*>(w_gate_up), ws);
  } else {
    decode_down_sum_kernel<T, NMAX><<<ceil_div(p.H, kDownRows), threads, 0, s>>>(
        p, static_cast<const T*>(w_down), ws, static_cast<T*>(out));
  }
}

// Smallest instantiated token capacity that holds T.
template <typename T>
void dispatch_tokens(const Problem& p, const void* x, const void* wgu, const void* wd,
                     const Workspace& ws, void* out, cudaStream_t s, bool gate_up) {
  if (p.T <= 1) launch_decode<T, 1>(p, x, wgu, wd, ws, out, s, gate_up);
  else if (p.T <= 2) launch_decode<T, 2>(p, x, wgu, wd, ws, out, s, gate_up);
  else if (p.T <= 4) launch_decode<T, 4>(p, x, wgu, wd, ws, out, s, gate_up);
  else if (p.T <= 8) launch_decode<T, 8>(p, x, wgu, wd, ws, out, s, gate_up);
  else launch_decode<T, kDecodeMaxTokens>(p, x, wgu, wd, ws, out, s, gate_up);
}

template <typename... Args>
void dispatch_dtype(const Problem& p, Args... args) {
  switch (p.dtype) {
    case MOE_DTYPE_F32: dispatch_tokens<float>(p, args...); break;
    case MOE_DTYPE_F16: dispatch_tokens<__half>(p, args...); break;
    case MOE_DTYPE_BF16: dispatch_tokens<__nv_bfloat16>(p, args...); break;
  }
}

void launch_decode_gate_up(const Problem& p, const void* x, const void* w_gate_up,
                           const Workspace& ws, cudaStream_t s) {
  dispatch_dtype(p, x, w_gate_up, (const void*)nullptr, ws, (void*)nullptr, s, true);
}

void launch_decode_down_sum(const Problem& p, const void* w_down, const Workspace& ws, void* out,
                            cudaStream_t s) {
  dispatch_dtype(p, (const void*)nullptr, (const void*)nullptr, w_down, ws, out, s, false);
}

}  // namespace moe
