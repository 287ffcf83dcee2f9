// Grouped GEMM on tensor cores (fp16/bf16 in, fp32 accumulate) over the expert-grouped rows.
// One block = one row tile of one expert (from the tile table) x one column tile:
//
//   gate_up: act[rows, n0:n0+64] = silu(A Wg^T) * (A Wu^T), A rows gathered from hidden through
//            perm_entry (no permuted copy of the input). The B tile interleaves 8 gate rows and
//            the 8 matching up rows, so each thread's accumulators hold gate and up of the same
//            outputs and the SiLU*up epilogue needs no shared-memory exchange.
//   down:    y[rows, n0:n0+128] = act[rows] Wd^T
//
// BK=64, 3-stage cp.async pipeline, 8 warps as 2 (M) x 4 (N), warp tile (BM/2) x 32.
#include "kernels.h"
#include "mma.cuh"

namespace moe {

constexpr int kBN = 128, kBK = 64, kStages = 3, kGemmThreads = 256;

template <int BM> constexpr int gemm_smem_bytes() { return kStages * (BM + kBN) * kBK * 2; }

template <typename T, int BM, bool GATED>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_gemm_kernel(Problem p, const T* __restrict__ a_src, const T* __restrict__ w,
                        T* __restrict__ c_out, Workspace ws) {
  constexpr int MT = BM / 2 / 16;  // m16 tiles per warp
  constexpr int A_LOADS = BM * 8 / kGemmThreads, B_LOADS = kBN * 8 / kGemmThreads;
  extern __shared__ uint4 smem[];

  if ((int)blockIdx.x >= *ws.num_tiles) return;
  const int e = ws.tile_expert[blockIdx.x];
  const int row0 = ws.tile_row[blockIdx.x];
  const int row_end = ws.expert_offsets[e + 1];
  const int kdim = GATED ? p.H : p.I;
  const int nout = GATED ? p.I : p.H;
  const int n0 = blockIdx.y * (GATED ? kBN / 2 : kBN);

  // Each thread copies a fixed 16-byte column chunk of fixed rows in every stage.
  const int chunk = threadIdx.x % 8, lrow = threadIdx.x / 8;
  const T* a_ptr[A_LOADS];
  bool a_ok[A_LOADS];
#pragma unroll
  for (int i = 0; i < A_LOADS; ++i) {
    const int r = row0 + lrow + i * 32;
    a_ok[i] = r < row_end;
    const int src = !a_ok[i] ? 0 : GATED ? ws.perm_entry[r] / p.K : r;
    a_ptr[i] = a_src + (size_t)src * kdim + chunk * 8;
  }
  const T* b_ptr[B_LOADS];
  bool b_ok[B_LOADS];
#pragma unroll
  for (int i = 0; i < B_LOADS; ++i) {
    const int r = lrow + i * 32;
    int wrow = GATED ? n0 + (r / 16) * 8 + r % 8 : n0 + r;
    b_ok[i] = wrow < nout;
    if (!b_ok[i]) wrow = 0;
    if (GATED) wrow = gate_up_row(p, wrow, (r % 16) >= 8);
    b_ptr[i] = w + ((size_t)e * (GATED ? 2 * p.I : p.H) + wrow) * kdim + chunk * 8;
  }

  auto stage_a = [&](int s) { return smem + s * (BM + kBN) * 8; };
  auto stage_b = [&](int s) { return smem + s * (BM + kBN) * 8 + BM * 8; };
  auto load_stage = [&](int s, int k0) {
    const bool k_ok = k0 + chunk * 8 < kdim;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i)
      cp_async_16(stage_a(s) + swizzle(lrow + i * 32, chunk), a_ptr[i] + k0, a_ok[i] && k_ok);
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i)
      cp_async_16(stage_b(s) + swizzle(lrow + i * 32, chunk), b_ptr[i] + k0, b_ok[i] && k_ok);
  };

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warp_m = warp / 4, warp_n = warp % 4;
  float acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  const int k_tiles = ceil_div(kdim, kBK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * kBK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for all threads; stage kt-1 is free to refill
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next * kBK);
    cp_async_commit();

    const uint4* sa = stage_a(kt % kStages);
    const uint4* sb = stage_b(kt % kStages);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[MT][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(af[mt], sa + swizzle(warp_m * (BM / 2) + mt * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, sb + swizzle(warp_n * 32 + np * 16 + lane % 8 + (lane / 16) * 8,
                                    kk * 2 + (lane / 8) % 2));
        bf[2 * np][0] = r[0]; bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2]; bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait<0>();

  // Accumulator (mt, nt, half*2 + {0,1}) is row lane/4 + 8*half, columns 2*(lane%4) + {0,1}.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + warp_m * (BM / 2) + mt * 16 + lane / 4 + half * 8;
      if (row >= row_end) continue;
      if (GATED) {
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          const int col = n0 + (2 * warp_n + pair) * 8 + 2 * (lane % 4);
          if (col >= nout) continue;
          const float* g = &acc[mt][2 * pair][half * 2];
          const float* u = &acc[mt][2 * pair + 1][half * 2];
          *reinterpret_cast<uint32_t*>(c_out + (size_t)row * nout + col) =
              pack2<T>(silu_mul(g[0], u[0]), silu_mul(g[1], u[1]));
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int col = n0 + warp_n * 32 + nt * 8 + 2 * (lane % 4);
          if (col >= nout) continue;
          *reinterpret_cast<uint32_t*>(c_out + (size_t)row * nout + col) =
              pack2<T>(acc[mt][nt][half * 2], acc[mt][nt][half * 2 + 1]);
        }
      }
    }
  }
}

template <typename T, int BM, bool GATED>
void launch_tc(const Problem& p, const void* a, const void* w, void* c, const Workspace& ws,
               cudaStream_t s) {
  constexpr int smem = gemm_smem_bytes<BM>();
  static const cudaError_t attr_set = cudaFuncSetAttribute(
      grouped_gemm_kernel<T, BM, GATED>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  (void)attr_set;  // a failure surfaces as the launch error
  const dim3 grid(max_tiles(p, BM), ceil_div(GATED ? p.I : p.H, GATED ? kBN / 2 : kBN));
  grouped_gemm_kernel<T, BM, GATED><<<grid, kGemmThreads, smem, s>>>(
      p, static_cast<const T*>(a), static_cast<const T*>(w), static_cast<T*>(c), ws);
}

template <bool GATED>
void launch_tc_dispatch(const Problem& p, const void* a, const void* w, void* c,
                        const Workspace& ws, int tile_m, cudaStream_t s) {
  const bool bf16 = p.dtype == MOE_DTYPE_BF16;
  if (tile_m == 128) {
    if (bf16) launch_tc<__nv_bfloat16, 128, GATED>(p, a, w, c, ws, s);
    else launch_tc<__half, 128, GATED>(p, a, w, c, ws, s);
  } else {
    if (bf16) launch_tc<__nv_bfloat16, 64, GATED>(p, a, w, c, ws, s);
    else launch_tc<__half, 64, GATED>(p, a, w, c, ws, s);
  }
}

void launch_gemm_f32(const Problem& p, const void* a, const void* w, void* c, const Workspace& ws,
                     bool gated, cudaStream_t s);

void launch_gemm_gate_up(const Problem& p, const void* x, const void* w_gate_up,
                         const Workspace& ws, int tile_m, cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_F32) launch_gemm_f32(p, x, w_gate_up, ws.act, ws, true, s);
  else launch_tc_dispatch<true>(p, x, w_gate_up, ws.act, ws, tile_m, s);
}

void launch_gemm_down(const Problem& p, const void* w_down, const Workspace& ws, int tile_m,
                      cudaStream_t s) {
  if (p.dtype == MOE_DTYPE_F32) launch_gemm_f32(p, ws.act, w_down, ws.y, ws, false, s);
  else launch_tc_dispatch<false>(p, ws.act, w_down, ws.y, ws, tile_m, s);
}

}  // namespace moe
