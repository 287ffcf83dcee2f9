// Decode path on tensor cores (fp16/bf16, 2 <= T <= kDecodeMaxTokens): the work split of the GEMV
// kernels (decode.cu), with the dot products done by mma.sync m16n8k16. The weights are the A
// operand (16 rows per warp), the tokens the B operand (8 per n-tile), so one weight load serves
// every token with no per-token FMAs (what bounds the FMA GEMV at 8 tokens).
//
// Both operands come straight from global memory in 16-byte loads, no shared memory, no ldmatrix:
// a dot product may visit k in any order as long as A and B agree, so lane (g, t) loads 8
// consecutive k of weight rows g and g+8 and of token g, and each 16-byte load feeds two k16 steps
// (register pair i of the load plays k = 2t + {0,1} and 2t + 8 + {0,1} of step i / 2).
//
//   gate_up: block (expert tile or shared chunk, 64 columns); warp = 8 gate rows + their 8 up rows,
//            so each lane's accumulators hold gate and up of the same outputs -> act [P, I]
//   down+sum: block = 16 rows of H; warps take (expert, k-slice) items, weight them by the routing
//            weight (or the shared gate), sum per token in a fixed order      -> out [T, H]
#include "common.cuh"
#include "kernels.h"
#include "mma.cuh"

namespace moe {

constexpr int kMmaGateUpWarps = 8;
constexpr int kMmaDownWarps = 16;
constexpr int kMmaDownSlice = 256;  // down: k elements per work item (balances the warps' items)

// acc[nt] += W[16 rows, k0:k0+len] x X[8 tokens of n-tile nt, same k]^T. Lane (g, t) passes its rows
// g and g+8 (w_lo, w_hi; null = zeros) and its token rows g + 8 nt (xs[nt]; null = zeros).
template <typename T, int NT>
__device__ __forceinline__ void mma_rows16(const T* w_lo, const T* w_hi, const T* const (&xs)[NT], int len,
                                           float (&acc)[NT][4]) {
  constexpr int U = NT == 1 ? 8 : 4;  // 16-byte loads of each weight row in flight per lane
  const int t = threadIdx.x % 4;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int base = 0; base < len; base += 32 * U) {  // uniform over the warp: mma.sync needs all lanes
    uint4 lo[U], hi[U], xv[U][NT];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int k = base + q * 32 + 8 * t;
      const bool ok = k < len;  // len % 8 == 0: a load is all in or all out
      lo[q] = ok && w_lo ? __ldcs(reinterpret_cast<const uint4*>(w_lo + k)) : zero;
      hi[q] = ok && w_hi ? __ldcs(reinterpret_cast<const uint4*>(w_hi + k)) : zero;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xv[q][nt] = ok && xs[nt] ? *reinterpret_cast<const uint4*>(xs[nt] + k) : zero;
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      if (base + q * 32 >= len) break;
      const uint32_t a0[4] = {lo[q].x, hi[q].x, lo[q].y, hi[q].y};
      const uint32_t a1[4] = {lo[q].z, hi[q].z, lo[q].w, hi[q].w};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b0[2] = {xv[q][nt].x, xv[q][nt].y};
        const uint32_t b1[2] = {xv[q][nt].z, xv[q][nt].w};
        mma_16816<T>(acc[nt], a0, b0);
        mma_16816<T>(acc[nt], a1, b1);
      }
    }
  }
}

// grid.x: `routed_grid` routed tiles (those past *num_tiles exit), then the shared expert's I_s in
// chunks of I, every token; grid.y: 64 columns of the tile or chunk.
template <typename T, int NT>
__global__ void __launch_bounds__(kMmaGateUpWarps* kWarp)
    mma_gate_up_kernel(Problem p, const T* __restrict__ x, const T* __restrict__ w, Workspace ws, Shared sh,
                       int routed_grid) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int j0 = (blockIdx.y * kMmaGateUpWarps + threadIdx.x / kWarp) * 8;  // the warp's 8 columns
  if (j0 >= p.I) return;  // I % 8 == 0: all 8 in range
  const T* xs[NT];
  const T *w_lo, *w_hi;
  T* dst;  // act row of the tile's first token, column j0 + g
  size_t dst_stride;
  int n;  // tokens of the tile
  if ((int)blockIdx.x < routed_grid) {
    if ((int)blockIdx.x >= *ws.num_tiles) return;
    const int e = ws.tile_expert[blockIdx.x];
    const int row0 = ws.expert_offsets[e];
    n = ws.expert_offsets[e + 1] - row0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int s = g + 8 * nt;
      xs[nt] = s < n ? x + (size_t)(ws.perm_entry[row0 + s] / p.K) * p.H : nullptr;
    }
    const T* we = w + (size_t)e * 2 * p.I * p.H;
    w_lo = we + (size_t)gate_up_row(p, j0 + g, 0) * p.H;
    w_hi = we + (size_t)gate_up_row(p, j0 + g, 1) * p.H;
    dst = static_cast<T*>(ws.act) + (size_t)row0 * p.I + j0 + g;
    dst_stride = p.I;
  } else {
    const int j = ((int)blockIdx.x - routed_grid) * p.I + j0;
    if (j >= sh.I) return;  // I_s % 8 == 0 as well
    n = p.T;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int s = g + 8 * nt;
      xs[nt] = s < n ? x + (size_t)s * p.H : nullptr;
    }
    const T* ws_ = static_cast<const T*>(sh.gate_up);
    w_lo = ws_ + (size_t)shared_gate_up_row(sh, j + g, 0) * p.H;
    w_hi = ws_ + (size_t)shared_gate_up_row(sh, j + g, 1) * p.H;
    dst = static_cast<T*>(sh.act) + j + g;
    dst_stride = sh.I;
  }
  float acc[NT][4] = {};
  mma_rows16<T, NT>(w_lo, w_hi, xs, p.H, acc);
  // acc[nt] = {gate, gate, up, up} of column j0 + g for tokens 8 nt + 2t and 8 nt + 2t + 1.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int s = 8 * nt + 2 * t + c;
      if (s < n) dst[(size_t)s * dst_stride] = from_float<T>(silu_mul(acc[nt][c], acc[nt][2 + c]));
    }
}

// Work items of a block: (routed tile, k-slice) first, then (shared k-slice); each warp sums its
// items into its own partial rows, and the block adds the warps' rows in a fixed order.
// routed = false: only the shared items, added to what out holds (the routed part ran apart).
template <typename T, int NT>
__global__ void __launch_bounds__(kMmaDownWarps* kWarp)
    mma_down_sum_kernel(Problem p, const T* __restrict__ w, Workspace ws, Shared sh, bool routed,
                        T* __restrict__ out) {
  constexpr int TMAX = 8 * NT;
  __shared__ float partial[kMmaDownWarps][16][TMAX];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  for (int i = threadIdx.x; i < kMmaDownWarps * 16 * TMAX; i += blockDim.x) (&partial[0][0][0])[i] = 0.f;
  __syncthreads();

  const int h0 = blockIdx.x * 16;
  const bool lo_ok = h0 + g < p.H, hi_ok = h0 + g + 8 < p.H;
  const int routed_slices = (int)ceil_div(p.I, kMmaDownSlice);
  const int routed_items = routed ? *ws.num_tiles * routed_slices : 0;
  const int items = routed_items + (sh.down ? (int)ceil_div(sh.I, kMmaDownSlice) : 0);
  const T* act = static_cast<const T*>(ws.act);
  for (int item = warp; item < items; item += kMmaDownWarps) {
    float acc[NT][4] = {};
    const T* xs[NT];
    if (item < routed_items) {
      const int e = ws.tile_expert[item / routed_slices];
      const int k0 = (item % routed_slices) * kMmaDownSlice, len = min(kMmaDownSlice, p.I - k0);
      const int row0 = ws.expert_offsets[e];
      const int n = ws.expert_offsets[e + 1] - row0;
      const T* we = w + (size_t)e * p.H * p.I + k0;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xs[nt] = g + 8 * nt < n ? act + (size_t)(row0 + g + 8 * nt) * p.I + k0 : nullptr;
      mma_rows16<T, NT>(lo_ok ? we + (size_t)(h0 + g) * p.I : nullptr, hi_ok ? we + (size_t)(h0 + g + 8) * p.I : nullptr,
                        xs, len, acc);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int s = 8 * nt + 2 * t + c;
          if (s >= n) continue;
          const int entry = ws.perm_entry[row0 + s];
          const float wt = ws.topk_w[entry];
          partial[warp][g][entry / p.K] += wt * acc[nt][c];
          partial[warp][g + 8][entry / p.K] += wt * acc[nt][2 + c];
        }
    } else {  // the shared expert: every token, weighted by its gate
      const int k0 = (item - routed_items) * kMmaDownSlice, len = min(kMmaDownSlice, sh.I - k0);
      const T* wd = static_cast<const T*>(sh.down) + k0;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        xs[nt] = g + 8 * nt < p.T ? static_cast<const T*>(sh.act) + (size_t)(g + 8 * nt) * sh.I + k0 : nullptr;
      mma_rows16<T, NT>(lo_ok ? wd + (size_t)(h0 + g) * sh.I : nullptr, hi_ok ? wd + (size_t)(h0 + g + 8) * sh.I : nullptr,
                        xs, len, acc);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int s = 8 * nt + 2 * t + c;
          if (s >= p.T) continue;
          const float gs = sh.gate_logits ? 1.f / (1.f + __expf(-sh.gate_logits[s])) : 1.f;
          partial[warp][g][s] += gs * acc[nt][c];
          partial[warp][g + 8][s] += gs * acc[nt][2 + c];
        }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * p.T; i += blockDim.x) {
    const int r = i / p.T, tok = i % p.T, h = h0 + r;
    if (h >= p.H) continue;
    float s = routed ? 0.f : to_float(out[(size_t)tok * p.H + h]);
    for (int wp = 0; wp < kMmaDownWarps; ++wp) s += partial[wp][r][tok];  // fixed order
    out[(size_t)tok * p.H + h] = from_float<T>(s);
  }
}

template <typename T, int NT>
void launch_mma(const Problem& p, const void* x, const void* w_gate_up, const void* w_down, const Workspace& ws,
                const Shared& sh, bool routed, void* out, cudaStream_t s, bool gate_up) {
  if (gate_up) {
    const int routed_grid = routed ? min(p.E, p.P) : 0;
    const int shared_grid = sh.gate_up ? (int)ceil_div(sh.I, p.I) : 0;
    const dim3 grid(routed_grid + shared_grid, ceil_div(p.I, kMmaGateUpWarps * 8));
    mma_gate_up_kernel<T, NT><<<grid, kMmaGateUpWarps * kWarp, 0, s>>>(
        p, static_cast<const T*>(x), static_cast<const T*>(w_gate_up), ws, sh, routed_grid);
  } else {
    mma_down_sum_kernel<T, NT><<<ceil_div(p.H, 16), kMmaDownWarps * kWarp, 0, s>>>(
        p, static_cast<const T*>(w_down), ws, sh, routed, static_cast<T*>(out));
  }
}

template <typename T>
void mma_dispatch_tokens(const Problem& p, const void* x, const void* wgu, const void* wd, const Workspace& ws,
                         const Shared& sh, bool routed, void* out, cudaStream_t s, bool gate_up) {
  static_assert(kDecodeMaxTokens <= 16, "two n-tiles of 8 tokens");
  if (p.T <= 8) launch_mma<T, 1>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
  else launch_mma<T, 2>(p, x, wgu, wd, ws, sh, routed, out, s, gate_up);
}

void launch_mma_gate_up(const Problem& p, const void* x, const void* w_gate_up, const Workspace& ws,
                        const Shared& shared, bool routed, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16)
    mma_dispatch_tokens<__nv_bfloat16>(p, x, w_gate_up, nullptr, ws, shared, routed, nullptr, s, true);
  else
    mma_dispatch_tokens<__half>(p, x, w_gate_up, nullptr, ws, shared, routed, nullptr, s, true);
}

void launch_mma_down_sum(const Problem& p, const void* w_down, const Workspace& ws, const Shared& shared, bool routed,
                         void* out, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16)
    mma_dispatch_tokens<__nv_bfloat16>(p, nullptr, nullptr, w_down, ws, shared, routed, out, s, false);
  else
    mma_dispatch_tokens<__half>(p, nullptr, nullptr, w_down, ws, shared, routed, out, s, false);
}

}  // namespace moe
