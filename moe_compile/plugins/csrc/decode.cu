// Decode path on CUDA cores (fp32 weights, and the routing gate/up launch at T = 1 for every
// dtype; 16-bit weights' other decode launches are decode_mma.cu): GEMV kernels that stream each
// selected expert's weights exactly once, whatever number of tokens chose it.
//   gate_up: block (expert tile, 8 output columns), warp = one gate row + its up row, all the
//            expert's tokens at once                                   -> act [P, I]
//   down+sum: block = 4 rows of H over every active expert; warps take (expert, 2 rows) items,
//            weight by the routing weight, sum per token in a fixed order -> out [T, H]
//   T = 1:   routing moves into gate_up (no launch of its own): every block routes the token with
//            one warp, block 0 writes the tables down+sum reads, and the grid (as many blocks as fit
//            on the GPU at once) streams (expert, column) items in a grid-stride loop.
//   shared expert (launcher.cu's shared_stream_tokens): its gate/up columns are more tiles of gate_up (at T = 1
//            streamed by the other 7 warps while one routes), its down rows more items of down+sum,
//            in chunks of I; each token's sum gets g_t times its term.
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

// acc[r][s] += w[r] . x_s for the n <= NMAX token vectors load(s): each weight element converted to
// float once and used for every token (converting per token made T = 8 bound by instructions).
template <typename T, int NMAX, int R, typename Load>
__device__ __forceinline__ void fma_tokens(const Vec<T> (&w)[R], int n, Load load, float (&acc)[R][NMAX]) {
  constexpr int V = Vec<T>::kElems;
  float wf[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < V; ++i) wf[r][i] = w[r].get(i);
#pragma unroll
  for (int s = 0; s < NMAX; ++s) {
    if (s < n) {
      const Vec<T> xv = load(s);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xi = xv.get(i);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][s] = fmaf(wf[r][i], xi, acc[r][s]);
      }
    }
  }
}

// One warp: the gate/up row pairs of kCols columns (rows[c], rows[kCols + c]) dotted with n <= NMAX
// token rows xs[] -> dst[s * dst_stride + c] = silu(g) * u.
template <typename T, int NMAX>
__device__ __forceinline__ void gate_up_rows(int H, const T* const (&xs)[NMAX], int n, const T* const (&rows)[2 * kCols],
                                             T* dst, size_t dst_stride) {
  constexpr int V = Vec<T>::kElems, U = unroll<NMAX>(), R = 2 * kCols;
  const int lane = threadIdx.x % kWarp;
  float acc[R][NMAX];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int s = 0; s < NMAX; ++s) acc[r][s] = 0.f;
  for (int h0 = lane * V; h0 < H; h0 += kWarp * V * U) {
    Vec<T> wv[U][R];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[q][r].raw = make_uint4(0, 0, 0, 0);
        if (h < H) wv[q][r] = load_vec_stream(rows[r] + h);
      }
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      if (h >= H) break;
      fma_tokens<T, NMAX, R>(wv[q], n, [&](int s) { return load_vec(xs[s] + h); }, acc);
    }
  }
#pragma unroll
  for (int s = 0; s < NMAX; ++s) {
    if (s < n) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float g = warp_sum(acc[c][s]), u = warp_sum(acc[kCols + c][s]);
        if (lane == 0) dst[(size_t)s * dst_stride + c] = from_float<T>(silu_mul(g, u));
      }
    }
  }
}

// grid.x: `routed_grid` routed tiles (those past *num_tiles exit), then the shared expert's I_s in
// chunks of I, every token; grid.y: 8 columns of the chunk.
template <typename T, int NMAX>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode_gate_up_kernel(Problem p, const T* __restrict__ x, const T* __restrict__ w, Workspace ws, Shared sh,
                          int routed_grid) {
  const int col = (blockIdx.y * kDecodeWarps + threadIdx.x / kWarp) * kCols;
  if (col >= p.I) return;  // I % 8 == 0, so col < I covers all kCols columns
  const T* xs[NMAX];
  const T* rows[2 * kCols];
  if ((int)blockIdx.x < routed_grid) {
    if ((int)blockIdx.x >= *ws.num_tiles) return;
    const int e = ws.tile_expert[blockIdx.x];
    const int row0 = ws.expert_offsets[e];
    const int n = ws.expert_offsets[e + 1] - row0;
#pragma unroll
    for (int s = 0; s < NMAX; ++s) xs[s] = x + (size_t)(ws.perm_entry[row0 + min(s, n - 1)] / p.K) * p.H;
#pragma unroll
    for (int r = 0; r < 2 * kCols; ++r)
      rows[r] = w + ((size_t)e * 2 * p.I + gate_up_row(p, col + r % kCols, r >= kCols)) * p.H;
    gate_up_rows<T, NMAX>(p.H, xs, n, rows, static_cast<T*>(ws.act) + (size_t)row0 * p.I + col, p.I);
  } else {
    const int j = ((int)blockIdx.x - routed_grid) * p.I + col;
    if (j >= sh.I) return;  // I_s % 8 == 0 as well
#pragma unroll
    for (int s = 0; s < NMAX; ++s) xs[s] = x + (size_t)min(s, p.T - 1) * p.H;
    const T* ws_ = static_cast<const T*>(sh.gate_up);
#pragma unroll
    for (int r = 0; r < 2 * kCols; ++r)
      rows[r] = ws_ + (size_t)shared_gate_up_row(sh, j + r % kCols, r >= kCols) * p.H;
    gate_up_rows<T, NMAX>(p.H, xs, p.T, rows, static_cast<T*>(sh.act) + j, sh.I);
  }
}

// One warp: a gate row and its up row (H wide), dotted with x [H] -> *dst = silu(g) * u.
template <typename T>
__device__ __forceinline__ void gate_up_column(int H, const T* __restrict__ x, const T* __restrict__ gate,
                                               const T* __restrict__ up, T* dst) {
  constexpr int V = Vec<T>::kElems, U = unroll<1>();
  const int lane = threadIdx.x % kWarp;
  float g = 0.f, u = 0.f;
  for (int h0 = lane * V; h0 < H; h0 += kWarp * V * U) {
    Vec<T> gv[U], uv[U];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      gv[q].raw = uv[q].raw = make_uint4(0, 0, 0, 0);
      if (h < H) { gv[q] = load_vec_stream(gate + h); uv[q] = load_vec_stream(up + h); }
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int h = h0 + q * kWarp * V;
      if (h >= H) break;
      const Vec<T> xv = load_vec(x + h);
      g += dot_vec(gv[q], xv);
      u += dot_vec(uv[q], xv);
    }
  }
  g = warp_sum(g);
  u = warp_sum(u);
  if (lane == 0) *dst = from_float<T>(silu_mul(g, u));
}

template <typename T>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode1_route_gate_up_kernel(Problem p, const T* __restrict__ x, const float* __restrict__ logits,
                                 const float* __restrict__ bias, const T* __restrict__ w, Workspace ws,
                                 Shared sh) {
  extern __shared__ float route_scratch[];  // sel [E], score [E]
  __shared__ TokenRoute route;
  const int warp = threadIdx.x / kWarp;
  if (warp == 0) {
    route_one_token_warp(p, logits, bias, route_scratch, route);
    route_one_token_rows(p, ws, route, blockIdx.x == 0);
  } else if (sh.gate_up) {  // the shared expert needs no routing: its columns stream meanwhile
    const T* ws_ = static_cast<const T*>(sh.gate_up);
    T* act_s = static_cast<T*>(sh.act);
    const int per_block = kDecodeWarps - 1;
    for (int j = blockIdx.x * per_block + warp - 1; j < sh.I; j += gridDim.x * per_block)
      gate_up_column(p.H, x, ws_ + (size_t)shared_gate_up_row(sh, j, 0) * p.H,
                     ws_ + (size_t)shared_gate_up_row(sh, j, 1) * p.H, act_s + j);
  }
  __syncthreads();
  if (blockIdx.x == 0) route_one_token_offsets(p, route, ws);
  T* act = static_cast<T*>(ws.act);
  const int items = p.K * p.I, stride = gridDim.x * kDecodeWarps;
  for (int item = blockIdx.x * kDecodeWarps + warp; item < items; item += stride) {
    const int row = item / p.I, j = item % p.I;
    const T* we = w + (size_t)route.by_row[row] * 2 * p.I * p.H;
    gate_up_column(p.H, x, we + (size_t)gate_up_row(p, j, 0) * p.H, we + (size_t)gate_up_row(p, j, 1) * p.H,
                   act + (size_t)row * p.I + j);
  }
}

// One warp: R rows of a down matrix (row stride `stride`, `len` wide from w) dotted with n <= NMAX
// activation rows (act, act + act_stride, ...) -> acc[r][s], lane-partial (warp_sum to finish).
template <typename T, int NMAX, int R>
__device__ __forceinline__ void dot_rows(const T* __restrict__ w, size_t stride, const T* __restrict__ act,
                                         size_t act_stride, int len, int n, float (&acc)[R][NMAX]) {
  constexpr int V = Vec<T>::kElems, U = unroll<NMAX>();
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int s = 0; s < NMAX; ++s) acc[r][s] = 0.f;
  for (int i0 = lane * V; i0 < len; i0 += kWarp * V * U) {
    Vec<T> wv[U][R];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int i = i0 + q * kWarp * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[q][r].raw = make_uint4(0, 0, 0, 0);
        if (i < len) wv[q][r] = load_vec_stream(w + (size_t)r * stride + i);
      }
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int i = i0 + q * kWarp * V;
      if (i >= len) break;
      fma_tokens<T, NMAX, R>(wv[q], n, [&](int s) { return load_vec(act + (size_t)s * act_stride + i); }, acc);
    }
  }
}

// Work items of a block: (routed tile, row pair) first, then (shared chunk, row pair); the shared
// expert's I_s is cut into chunks of the routed I so that every item streams about as much.
// routed = false: only the shared items, added to what out holds (the routed part ran apart).
template <typename T, int NMAX>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    decode_down_sum_kernel(Problem p, const T* __restrict__ w, Workspace ws, Shared sh, bool routed,
                           T* __restrict__ out) {
  constexpr int R = kRowsPerItem;
  constexpr int kItemsPerTile = kDownRows / R;
  __shared__ float partial[kDecodeWarps][kDownRows][NMAX];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = threadIdx.x; i < kDecodeWarps * kDownRows * NMAX; i += blockDim.x)
    (&partial[0][0][0])[i] = 0.f;
  __syncthreads();

  const int h_base = blockIdx.x * kDownRows;
  const int routed_tiles = routed ? *ws.num_tiles : 0;
  const int routed_items = routed_tiles * kItemsPerTile;
  const int shared_chunks = sh.down ? (int)ceil_div(sh.I, p.I) : 0;
  const int items = routed_items + shared_chunks * kItemsPerTile;
  const T* act = static_cast<const T*>(ws.act);
  for (int item = warp; item < items; item += kDecodeWarps) {
    const int tile = item / kItemsPerTile, r0 = (item % kItemsPerTile) * R, h0 = h_base + r0;
    if (h0 >= p.H) continue;  // H % 8 == 0: the item's R rows are all in range
    float acc[R][NMAX];
    if (item < routed_items) {
      const int e = ws.tile_expert[tile];
      const int row0 = ws.expert_offsets[e];
      const int n = ws.expert_offsets[e + 1] - row0;
      dot_rows<T, NMAX, R>(w + ((size_t)e * p.H + h0) * p.I, p.I, act + (size_t)row0 * p.I, p.I, p.I, n, acc);
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
    } else {  // the shared expert: every token, weighted by its gate
      const int i0 = (tile - routed_tiles) * p.I, len = min(p.I, sh.I - i0);
      dot_rows<T, NMAX, R>(static_cast<const T*>(sh.down) + (size_t)h0 * sh.I + i0, sh.I,
                           static_cast<const T*>(sh.act) + i0, sh.I, len, p.T, acc);
#pragma unroll
      for (int s = 0; s < NMAX; ++s) {
        if (s < p.T) {
          const float g = sh.gate_logits ? 1.f / (1.f + __expf(-sh.gate_logits[s])) : 1.f;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float v = warp_sum(acc[r][s]);
            if (lane == 0) partial[warp][r0 + r][s] += g * v;
          }
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kDownRows * p.T; i += blockDim.x) {
    const int r = i / p.T, t = i % p.T, h = h_base + r;
    if (h >= p.H) continue;
    float s = routed ? 0.f : to_float(out[(size_t)t * p.H + h]);
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
                    const Workspace& ws, const Shared& sh, cudaStream_t s) {
  const size_t smem = sizeof(float) * 2 * kMaxExperts;  // one occupancy figure for every E
  const int64_t work = sh.gate_up ? max(p.K * p.I, sh.I) : p.K * p.I;
  const int blocks = min(resident_blocks<T>(smem), (int)ceil_div(work, kDecodeWarps - 1));
  decode1_route_gate_up_kernel<T><<<blocks, kDecodeWarps * kWarp, sizeof(float) * 2 * p.E, s>>>(
      p, static_cast<const T*>(x), logits, bias, static_cast<const T*>(w_gate_up), ws, sh);
}

void launch_decode1_route_gate_up(const Problem& p, const void* x, const float* logits, const float* bias,
                                  const void* w_gate_up, const Workspace& ws, const Shared& sh, cudaStream_t s) {
  switch (p.dtype) {
    case MOE_DTYPE_F32: launch_decode1<float>(p, x, logits, bias, w_gate_up, ws, sh, s); break;
    case MOE_DTYPE_F16: launch_decode1<__half>(p, x, logits, bias, w_gate_up, ws, sh, s); break;
    case MOE_DTYPE_BF16: launch_decode1<__nv_bfloat16>(p, x, logits, bias, w_gate_up, ws, sh, s); break;
  }
}

template <typename T, int NMAX>
void launch_decode(const Problem& p, const void* x, const void* w_gate_up, const void* w_down,
                   const Workspace& ws, const Shared& sh, bool routed, void* out, cudaStream_t s, bool gate_up) {
  const int threads = kDecodeWarps * kWarp;
  if (gate_up) {
    const int routed_grid = routed ? min(p.E, p.P) : 0;
    const int shared_grid = sh.gate_up ? (int)ceil_div(sh.I, p.I) : 0;
    const dim3 grid(routed_grid + shared_grid, ceil_div(p.I, kDecodeWarps * kCols));
    decode_gate_up_kernel<T, NMAX><<<grid, threads, 0, s>>>(p, static_cast<const T*>(x),
                                                            static_cast<const T*>(w_gate_up), ws, sh, routed_grid);
  } else {
    decode_down_sum_kernel<T, NMAX><<<ceil_div(p.H, kDownRows), threads, 0, s>>>(
        p, static_cast<const T*>(w_down), ws, sh, routed, static_cast<T*>(out));
  }
}

// Smallest instantiated token capacity that holds T.
template <typename T>
void dispatch_tokens(const Problem& p, const void* x, const void* wgu, const void* wd,
                     const Workspace& ws, const Shared& sh, bool routed, void* out, cudaStream_t s, bool gate_up) {
  if (p.T <= 1) launch_decode<T, 1>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
  else if (p.T <= 2) launch_decode<T, 2>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
  else if (p.T <= 4) launch_decode<T, 4>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
  else if (p.T <= 8) launch_decode<T, 8>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
  else launch_decode<T, kDecodeMaxTokens>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
}

// fp32 only: 16-bit weights take the tensor-core kernels (launcher.cu: use_mma).
void launch_decode_gate_up(const Problem& p, const void* x, const void* w_gate_up, const Workspace& ws,
                           const Shared& shared, bool routed, cudaStream_t s) {
  dispatch_tokens<float>(p, x, w_gate_up, nullptr, ws, shared, routed, nullptr, s, true);
}

void launch_decode_down_sum(const Problem& p, const void* w_down, const Workspace& ws, const Shared& shared,
                            bool routed, void* out, cudaStream_t s) {
  dispatch_tokens<float>(p, nullptr, nullptr, w_down, ws, shared, routed, out, s, false);
}

}  // namespace moe
