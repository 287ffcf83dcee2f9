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
//
// Block-quantized routed experts (int4/int8 codes, a scale per block: fused_moe.h) run the same kernels:
// a lane's 16-byte load of codes holds 32 (int4) or 16 (int8) consecutive k, which it turns into the
// register pairs of as many 16-bit loads (fp16: the exact magic-number conversion, then one multiply by
// the block's scale), so the bytes read per weight drop 4x or 2x and nothing else changes.
// At T = 1 (quantized) both launches route the token themselves and the down launch starts while gate/up
// runs (programmatic dependent launch, sm_90+): mma_dispatch_bits.
#include <stdlib.h>

#include "common.cuh"
#include "kernels.h"
#include "mma.cuh"
#include "quant_rows.cuh"

namespace moe {

// Where a T = 1 quantized launch's time goes (bench/moe_phases.py): in a library built with
// `--define MOE_COMPILE_PHASES`, thread 0 of each block stamps %globaltimer at each phase of the two launches,
// [launch: 0 gate/up, 1 down][block][phase] (the phases: moe_phases.py), which moe_compile_phase_times reads back.
// Otherwise phase() is nothing.
#ifdef MOE_COMPILE_PHASES
constexpr int kPhaseBlocks = 1024;
__device__ unsigned long long g_phases[2][kPhaseBlocks][8];
__device__ __forceinline__ void phase(int launch, int i) {
  if (threadIdx.x != 0) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  const int b = blockIdx.x + gridDim.x * blockIdx.y;
  if (b < kPhaseBlocks) g_phases[launch][b][i] = t;
}
#else
__device__ __forceinline__ void phase(int, int) {}
#endif

}  // namespace moe
// the routing warp's own phases (routing.cuh): the gate/up grid is two-dimensional, the down grid one
#define ROUTE_STAMP(i) ::moe::phase(gridDim.y > 1 ? 0 : 1, i)
#include "routing.cuh"

namespace moe {

constexpr int kMmaGateUpWarps = 8;
constexpr int kMmaDownWarps = 16;
constexpr int kMmaDownSlice = 256;  // down: k elements per work item (balances the warps' items)

// acc[nt] += W[16 rows, k0:k0+len] x X[8 tokens of n-tile nt, same k]^T. Lane (g, t) passes its rows
// g and g+8 (w_lo, w_hi; null = zeros) and its token rows g + 8 nt (xs[nt]; null = zeros). wait: X is the
// output of the launch before, which may still run (wait_for_producer before X is read).
template <typename T, int NT>
__device__ __forceinline__ void mma_rows16(const T* w_lo, const T* w_hi, const T* const (&xs)[NT], int len,
                                           float (&acc)[NT][4], bool wait = false) {
  if (wait) wait_for_producer();
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

// The shared expert's rows as the routed rows' type: 16-bit pointers, or codes with their scales (a quantized
// build quantizes the shared expert at the routed experts' bits and block: Shared's scales, QuantRows' block).
template <typename T>
__device__ __forceinline__ const T* shared_rows(const T*, const void* rows, const void*) {
  return static_cast<const T*>(rows);
}
template <typename T, int BITS, int U>
__device__ __forceinline__ QuantRows<T, BITS, U> shared_rows(const QuantRows<T, BITS, U>& routed, const void* rows,
                                                             const void* scales) {
  return {static_cast<const uint8_t*>(rows), static_cast<const T*>(scales), routed.block};
}

// grid.x: `routed_grid` routed tiles (those past *num_tiles exit), then the shared expert's I_s in
// chunks of I, every token; grid.y: 64 / KSPLIT columns of the tile or chunk. W: the routed experts' rows
// (const T*, or QuantRows); the shared expert's rows are of the same type (shared_rows). KSPLIT > 1
// (quantized rows, whose codes are too few to keep a warp a row group's whole H busy): KSPLIT warps share
// 8 columns, each a slice of H in multiples of 128, and add their sums in a fixed order through shared memory.
// ROUTE (T = 1, routed_grid = K, dynamic shared memory 2E floats): the kernel routes the token itself
// (routing.cuh: route_one_token_warp) and tile r is the token's r-th choice (act row r), so one launch
// less a step; it lets the down launch start early (allow_dependent_launch). No block writes the routing tables:
// the down kernel at T = 1 routes the token too. ROUTE launches start as the launch before's programmatic dependents
// (the router's logits, router.cu): a routed block waits for it before it routes, a shared block once its first
// weights are in flight; the routed blocks let the down launch start only after their wait, since down's routing
// warp reads the logits at once.
template <typename T, int NT, typename W, int KSPLIT, bool ROUTE, int WARPS>
__global__ void __launch_bounds__(WARPS* kWarp)
    mma_gate_up_kernel(Problem p, const T* __restrict__ x, W w, Workspace ws, Shared sh, int routed_grid,
                       const float* __restrict__ logits, const float* __restrict__ bias) {
  if constexpr (ROUTE) phase(0, 0);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int split = warp % KSPLIT;
  const int j0 = (blockIdx.y * (WARPS / KSPLIT) + warp / KSPLIT) * 8;  // the warp's 8 columns
  const int per_split = (int)ceil_div(ceil_div(p.H, 128), KSPLIT) * 128, k0 = split * per_split;
  const int len = max(0, min(per_split, p.H - k0));
  bool active = j0 < p.I;  // I % 8 == 0: all 8 in range
  const T* xs[NT];
  float acc[NT][4] = {};
  T* dst = nullptr;  // act row of the tile's first token, column j0 + g
  size_t dst_stride = 0;
  int n = 0;  // tokens of the tile
  if ((int)blockIdx.x < routed_grid) {
    int e, row0;
    if constexpr (ROUTE) {
      extern __shared__ float route_scratch[];  // sel [E], score [E]
      __shared__ TokenRoute route;
      wait_for_producer();       // the logits (and x) are the launch before's output
      phase(0, 1);
      allow_dependent_launch();  // so the down launch, which routes from the same logits, starts after that one
      if (warp == 0) route_one_token_warp(p, logits, bias, route_scratch, route, false);  // the experts alone
      __syncthreads();
      phase(0, 2);
      e = route.pick[blockIdx.x], row0 = blockIdx.x, n = 1;
    } else {
      if ((int)blockIdx.x >= *ws.num_tiles) return;  // the whole block
      e = ws.tile_expert[blockIdx.x];
      row0 = ws.expert_offsets[e];
      n = ws.expert_offsets[e + 1] - row0;
    }
    if (active) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int s = g + 8 * nt;
        // ROUTE: the one token
        const int token = ROUTE || s >= n ? 0 : ws.perm_entry[row0 + s] / p.K;
        xs[nt] = s < n ? x + (size_t)token * p.H + k0 : nullptr;
      }
      const W we = w + ((size_t)e * 2 * p.I * p.H + k0);
      mma_rows16<T, NT>(we + (size_t)gate_up_row(p, j0 + g, 0) * p.H, we + (size_t)gate_up_row(p, j0 + g, 1) * p.H, xs,
                        len, acc);
      dst = static_cast<T*>(ws.act) + (size_t)row0 * p.I + j0 + g;
      dst_stride = p.I;
    }
  } else {
    if constexpr (ROUTE) allow_dependent_launch();  // the routed blocks hold the down launch back until the logits are in
    const int j = ((int)blockIdx.x - routed_grid) * p.I + j0;
    active = active && j < sh.I;  // I_s % 8 == 0 as well
    n = p.T;
    if (active) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int s = g + 8 * nt;
        xs[nt] = s < n ? x + (size_t)s * p.H + k0 : nullptr;
      }
      const W ws_ = shared_rows(w, sh.gate_up, sh.gate_up_scales) + k0;
      mma_rows16<T, NT>(ws_ + (size_t)shared_gate_up_row(sh, j + g, 0) * p.H,
                        ws_ + (size_t)shared_gate_up_row(sh, j + g, 1) * p.H, xs, len, acc, ROUTE);
      dst = static_cast<T*>(sh.act) + j + g;
      dst_stride = sh.I;
    }
  }
  if constexpr (ROUTE) phase(0, 3);
  if (!add_split_sums<NT, KSPLIT, WARPS>(acc)) return;
  if constexpr (ROUTE) phase(0, 4);
  if (!active) return;
  // acc[nt] = {gate, gate, up, up} of column j0 + g for tokens 8 nt + 2t and 8 nt + 2t + 1.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int s = 8 * nt + 2 * t + c;
      if (s < n) dst[(size_t)s * dst_stride] = from_float<T>(silu_mul(acc[nt][c], acc[nt][2 + c]));
    }
  if constexpr (ROUTE) phase(0, 5);
}

// Work items of a block: (routed tile, k-slice of `slice`) first, then (shared k-slice); each warp sums its
// items into its own partial rows, and the block adds the warps' rows in a fixed order.
// routed = false: only the shared items, added to what out holds (the routed part ran apart).
// ROUTE (T = 1, dynamic shared memory 2E floats): the block routes the token itself, as the gate/up launch
// does, instead of reading routing tables; then nothing but act depends on that launch, and the
// kernel, launched as its programmatic dependent (launch_mma), loads its first weights while the gate/up
// launch finishes and waits for it only before it reads act (mma_rows16's `wait`). Warp 0 routes; a warp waits for
// it only before its first routed item, the shared expert's items stream meanwhile (H200, A2.7B int4 with its shared
// expert at T = 1: 24.2 -> 22.9 us; int8 32.5 -> 30.6; docs/BENCHMARKS.md, fourteenth run); `slice`: down_slice.
template <typename T, int NT, typename W, int WARPS, bool ROUTE>
__global__ void __launch_bounds__(WARPS* kWarp)
    mma_down_sum_kernel(Problem p, W w, Workspace ws, Shared sh, bool routed, int slice, T* __restrict__ out,
                        const float* __restrict__ logits, const float* __restrict__ bias) {
  if constexpr (ROUTE) phase(1, 0);
  constexpr int TMAX = 8 * NT;
  __shared__ float partial[WARPS][16][TMAX];
  __shared__ TokenRoute route;
  __shared__ int routed_flag;  // ROUTE: warp 0 has written route
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * TMAX; i += kWarp) (&partial[warp][0][0])[i] = 0.f;  // the warp's own: no barrier
  if constexpr (ROUTE) {
    if (threadIdx.x == 0) routed_flag = 0;
    __syncthreads();  // before warp 0 can set it; the block's warps start together
  }
  __syncwarp();

  const int h0 = blockIdx.x * 16;
  const bool lo_ok = h0 + g < p.H, hi_ok = h0 + g + 8 < p.H;
  const int routed_slices = (int)ceil_div(p.I, slice);
  // ROUTE: the routing is not known before the flag below, so no table is read for the count
  const int routed_items = !routed ? 0 : (ROUTE ? p.K : *ws.num_tiles) * routed_slices;
  const int shared_items = sh.down ? (int)ceil_div(sh.I, slice) : 0;
  const int items = routed_items + shared_items;
  const T* act = static_cast<const T*>(ws.act);
  auto run_item = [&](int item) {  // items below routed_items: (routed tile, slice); the rest: shared slices
    float acc[NT][4] = {};
    const T* xs[NT];
    if (item < routed_items) {
      const int tile = item / routed_slices, e = ROUTE ? route.pick[tile] : ws.tile_expert[tile];
      const int k0 = (item % routed_slices) * slice, len = min(slice, p.I - k0);
      // ROUTE: tile r is act row r (gate/up's routing), so no table lookup stands before the weights' loads
      const int row0 = ROUTE ? tile : ws.expert_offsets[e];
      const int n = ROUTE ? 1 : ws.expert_offsets[e + 1] - row0;
      const W we = w + ((size_t)e * p.H * p.I + k0);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xs[nt] = g + 8 * nt < n ? act + (size_t)(row0 + g + 8 * nt) * p.I + k0 : nullptr;
      mma_rows16<T, NT>(lo_ok ? we + (size_t)(h0 + g) * p.I : W{}, hi_ok ? we + (size_t)(h0 + g + 8) * p.I : W{}, xs,
                        len, acc, ROUTE);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int s = 8 * nt + 2 * t + c;
          if (s >= n) continue;
          const int entry = ROUTE ? 0 : ws.perm_entry[row0 + s];  // ROUTE: one token, entry / K = 0
          const float wt = ROUTE ? route.pick_w[tile] : ws.topk_w[entry];
          partial[warp][g][entry / p.K] += wt * acc[nt][c];
          partial[warp][g + 8][entry / p.K] += wt * acc[nt][2 + c];
        }
    } else {  // the shared expert: every token, weighted by its gate
      const int k0 = (item - routed_items) * slice, len = min(slice, sh.I - k0);
      const W wd = shared_rows(w, sh.down, sh.down_scales) + k0;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        xs[nt] = g + 8 * nt < p.T ? static_cast<const T*>(sh.act) + (size_t)(g + 8 * nt) * sh.I + k0 : nullptr;
      mma_rows16<T, NT>(lo_ok ? wd + (size_t)(h0 + g) * sh.I : W{}, hi_ok ? wd + (size_t)(h0 + g + 8) * sh.I : W{}, xs,
                        len, acc, ROUTE);
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
  };
  if constexpr (ROUTE) {
    // Warp 0 routes the token while the others stream the shared expert's rows, which need no routing: a warp takes
    // the shared items first and waits for the routing (`routed_flag`) only before its first routed item, and
    // warp 0 takes the last turn of the first round, so that routing delays only the routed items.
    extern __shared__ float route_scratch[];  // sel [E], score [E]
    if (warp == 0) {
      route_one_token_warp(p, logits, bias, route_scratch, route);
      __syncwarp();
      if (lane == 0) {
        __threadfence_block();  // the choices before the flag
        *reinterpret_cast<volatile int*>(&routed_flag) = 1;
      }
    }
    phase(1, 1);
    bool have_route = warp == 0;
    for (int i = (warp + WARPS - 1) % WARPS; i < items; i += WARPS) {
      const int item = i < shared_items ? routed_items + i : i - shared_items;
      if (item < routed_items && !have_route) {
        while (*reinterpret_cast<volatile int*>(&routed_flag) == 0) __nanosleep(32);
        __threadfence_block();  // the choices after the flag
        have_route = true;
      }
      run_item(item);
    }
  } else {
    for (int item = warp; item < items; item += WARPS) run_item(item);
  }
  if constexpr (ROUTE) phase(1, 2);
  if constexpr (ROUTE) wait_for_producer();  // every block: out is written, and this grid ends, after gate/up's
  if constexpr (ROUTE) phase(1, 3);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * p.T; i += blockDim.x) {
    const int r = i / p.T, tok = i % p.T, h = h0 + r;
    if (h >= p.H) continue;
    float s = routed ? 0.f : to_float(out[(size_t)tok * p.H + h]);
    for (int wp = 0; wp < WARPS; ++wp) s += partial[wp][r][tok];  // fixed order
    out[(size_t)tok * p.H + h] = from_float<T>(s);
  }
  if constexpr (ROUTE) phase(1, 4);
}

// The down launch's slice at T = 1: `slice` (kQuantDownSlice), or the shortest multiple of 128 (whole quantization
// blocks) that gives each warp at most one item (K routed slices of I, the shared expert's of I_s) where that takes
// fewer rounds of loads (round_k: k a round of a warp's loads) for the warp with the most. A warp's items and rounds
// run one after another. A2.7B with its shared expert, 16 warps: int8 at 512 gives 7 warps two items of two rounds,
// at 768 every warp one of three; int4 at 512 two of one, at 768 one of two. One item a warp for both (H200, the
// down kernel alone, docs/BENCHMARKS.md twentieth run): int8 16.3 -> 15.0 us, int4 12.1 -> 13.0, so int4 stays.
inline int down_slice(const Problem& p, const Shared& sh, int warps, int slice, int round_k) {
  const int I_s = sh.down ? sh.I : 0, longest = (int)ceil_div(max(p.I, I_s), 128) * 128;
  const auto items = [&](int s) { return (int)(p.K * ceil_div(p.I, s) + ceil_div(I_s, s)); };
  const auto rounds = [&](int s) { return (int)(ceil_div(items(s), warps) * ceil_div(s, round_k)); };
  int one = 128;
  while (one < longest && items(one) > warps) one += 128;
  return rounds(one) < rounds(slice) ? one : slice;
}

// ROUTE: gate_up and down route the token themselves (T = 1; logits and bias as moe_compile_forward takes them).
template <typename T, int NT, typename WG, typename WD, int KSPLIT = 1, int SLICE = kMmaDownSlice, bool ROUTE = false,
          int GATE_UP_WARPS = kMmaGateUpWarps, int DOWN_WARPS = kMmaDownWarps>
void launch_mma(const Problem& p, const void* x, WG w_gate_up, WD w_down, const Workspace& ws, const Shared& sh,
                bool routed, void* out, cudaStream_t s, bool gate_up, const float* logits = nullptr,
                const float* bias = nullptr) {
  if (gate_up) {
    const int routed_grid = routed ? min(p.E, p.P) : 0;
    const int shared_grid = sh.gate_up ? (int)ceil_div(sh.I, p.I) : 0;
    const dim3 grid(routed_grid + shared_grid, ceil_div(p.I, GATE_UP_WARPS / KSPLIT * 8));
    const size_t smem = ROUTE ? sizeof(float) * 2 * p.E : 0;
    // ROUTE: start while the launch before runs (the router's, which lets it): the shared expert's first weights
    // are in flight before the wait
    launch_programmatic(ROUTE, mma_gate_up_kernel<T, NT, WG, KSPLIT, ROUTE, GATE_UP_WARPS>, grid,
                        dim3(GATE_UP_WARPS * kWarp), smem, s, p, static_cast<const T*>(x), w_gate_up, ws, sh,
                        routed_grid, logits, bias);
  } else {
    int slice = SLICE;
    if constexpr (ROUTE) slice = down_slice(p, sh, DOWN_WARPS, SLICE, WD::kRoundK);
    // ROUTE: start while the gate/up launch runs (sm_90+; earlier GPUs serialise)
    launch_programmatic(ROUTE, mma_down_sum_kernel<T, NT, WD, DOWN_WARPS, ROUTE>, dim3(ceil_div(p.H, 16)),
                        dim3(DOWN_WARPS * kWarp), ROUTE ? sizeof(float) * 2 * p.E : 0, s, p, w_down, ws, sh, routed,
                        slice, static_cast<T*>(out), logits, bias);
  }
}

template <typename T>
void mma_dispatch_dense(const Problem& p, const void* x, const void* wgu, const void* wd, const Workspace& ws,
                        const Shared& sh, bool routed, void* out, cudaStream_t s, bool gate_up) {
  static_assert(kDecodeMaxTokens <= 16, "two n-tiles of 8 tokens");
  const T *g = static_cast<const T*>(wgu), *d = static_cast<const T*>(wd);
  if (p.T <= 8) launch_mma<T, 1, const T*, const T*>(p, x, g, d, ws, sh, routed, out, s, gate_up);
  else launch_mma<T, 2, const T*, const T*>(p, x, g, d, ws, sh, routed, out, s, gate_up);
}

// Quantized experts: a 16-byte load holds 2-4x the weights of a 16-bit one, so each warp gets less of H
// (KSPLIT warps a row group at one n-tile, 2 at two) and the down kernel longer slices (kQuantDownSlice at
// 2 <= T <= 8; T = 1: down_slice), and loads in flight cover a warp's whole range.
constexpr int kQuantDownSlice = 512;

// Gate/up in rounds of GU_U loads a lane, KSPLIT warps a row group, WARPS warps a block; down in rounds of 4.
template <typename T, int BITS, int NT, int GU_U, int KSPLIT, bool ROUTE, int WARPS>
void launch_quantized(const Problem& p, const void* x, const QuantWeights& w, const Workspace& ws, const Shared& sh,
                      void* out, cudaStream_t s, bool gate_up, const Route& r) {
  using G = QuantRows<T, BITS, GU_U>;
  using D = QuantRows<T, BITS, 4>;  // a slice: kQuantDownSlice / 4C loads, in rounds of 4 (int8: two)
  const G wgu{static_cast<const uint8_t*>(w.gate_up), static_cast<const T*>(w.gate_up_scales), w.block};
  const D wd{static_cast<const uint8_t*>(w.down), static_cast<const T*>(w.down_scales), w.block};
  launch_mma<T, NT, G, D, KSPLIT, kQuantDownSlice, ROUTE, WARPS>(p, x, wgu, wd, ws, sh, true, out, s, gate_up, r.logits,
                                                                 r.bias);
}

// T = 1 (batch-1 decode): both launches route the token from r, and down starts as gate/up's programmatic
// dependent. Gate/up in blocks of 4 warps, 2 a row group, rounds of 2 loads (int4: 4 rounds over A2.7B's
// H = 2048), so that every block fits the GPU at once. H200, an A2.7B layer with its shared expert, over 8
// copies of the weights (bench/sweep_quant_decode1.py at 89e12a9; docs/FUSED_MOE.md): int4 35.0 -> 29.2 us,
// int8 43.3 -> 38.4, against the T <= 8 setting.
// T <= 8, one n-tile: 4 warps a row group, one round of 4 loads = 512 of H = 2048 (int8: two rounds, 98 registers
// where one took 146; gate/up at T = 1 23.3 -> 20.3 us, 39.0 -> 26.7 with the shared expert: docs/FUSED_MOE.md).
// Two n-tiles: 2 warps a row group, rounds of 8 loads (1024 of H at int4, 512 at int8).
template <typename T, int BITS>
void mma_dispatch_bits(const Problem& p, const void* x, const QuantWeights& w, const Workspace& ws, const Shared& sh,
                       void* out, cudaStream_t s, bool gate_up, const Route& r) {
  if (p.T == 1) launch_quantized<T, BITS, 1, 2, 2, true, 4>(p, x, w, ws, sh, out, s, gate_up, r);
  else if (p.T <= 8) launch_quantized<T, BITS, 1, 4, 4, false, kMmaGateUpWarps>(p, x, w, ws, sh, out, s, gate_up, r);
  else launch_quantized<T, BITS, 2, 8, 2, false, kMmaGateUpWarps>(p, x, w, ws, sh, out, s, gate_up, r);
}

template <typename T>
void mma_dispatch_quantized(const Problem& p, const void* x, const QuantWeights& w, const Workspace& ws,
                            const Shared& sh, void* out, cudaStream_t s, bool gate_up, const Route& r = {}) {
  if (w.bits == 4) mma_dispatch_bits<T, 4>(p, x, w, ws, sh, out, s, gate_up, r);
  else mma_dispatch_bits<T, 8>(p, x, w, ws, sh, out, s, gate_up, r);
}

void launch_mma_gate_up(const Problem& p, const void* x, const void* w_gate_up, const Workspace& ws,
                        const Shared& shared, bool routed, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16)
    mma_dispatch_dense<__nv_bfloat16>(p, x, w_gate_up, nullptr, ws, shared, routed, nullptr, s, true);
  else
    mma_dispatch_dense<__half>(p, x, w_gate_up, nullptr, ws, shared, routed, nullptr, s, true);
}

void launch_mma_down_sum(const Problem& p, const void* w_down, const Workspace& ws, const Shared& shared, bool routed,
                         void* out, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16)
    mma_dispatch_dense<__nv_bfloat16>(p, nullptr, nullptr, w_down, ws, shared, routed, out, s, false);
  else
    mma_dispatch_dense<__half>(p, nullptr, nullptr, w_down, ws, shared, routed, out, s, false);
}

void launch_mma_gate_up_quantized(const Problem& p, const void* x, const QuantWeights& w, const Workspace& ws,
                                  const Shared& shared, const Route& route, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16) mma_dispatch_quantized<__nv_bfloat16>(p, x, w, ws, shared, nullptr, s, true, route);
  else mma_dispatch_quantized<__half>(p, x, w, ws, shared, nullptr, s, true, route);
}

void launch_mma_down_sum_quantized(const Problem& p, const QuantWeights& w, const Workspace& ws, const Shared& shared,
                                   const Route& route, void* out, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_BF16) mma_dispatch_quantized<__nv_bfloat16>(p, nullptr, w, ws, shared, out, s, false, route);
  else mma_dispatch_quantized<__half>(p, nullptr, w, ws, shared, out, s, false, route);
}

}  // namespace moe

#ifdef MOE_COMPILE_PHASES
// The stamps into out (2 x 1024 x 8 uint64, ns), or (clear) all back to zero. MOE_ERR_CUDA on a failed copy.
extern "C" int moe_compile_phase_times(unsigned long long* out, int clear) {
  void* stamps = nullptr;
  if (cudaGetSymbolAddress(&stamps, moe::g_phases) != cudaSuccess) return MOE_ERR_CUDA;
  const cudaError_t rc = clear ? cudaMemset(stamps, 0, sizeof(moe::g_phases))
                               : cudaMemcpy(out, stamps, sizeof(moe::g_phases), cudaMemcpyDeviceToHost);
  return rc == cudaSuccess ? MOE_OK : MOE_ERR_CUDA;
}
#endif
