// Grouped GEMM for fp32 on CUDA cores (exact fp32 FMA, no tf32), same tile table and epilogues
// as gemm_tc.cu: 64 rows x 64 output columns per block, 16x16 threads of 4x4 outputs each.
#include "common.cuh"
#include "kernels.h"

namespace moe {

constexpr int kF32Tile = 64, kF32BK = 16;

template <bool GATED>
__global__ void __launch_bounds__(256)
    grouped_gemm_f32_kernel(Problem p, const float* __restrict__ a_src,
                            const float* __restrict__ w, float* __restrict__ c_out, Workspace ws) {
  __shared__ float as[kF32BK][kF32Tile + 4];
  __shared__ float bs[GATED ? 2 : 1][kF32BK][kF32Tile + 4];
  if ((int)blockIdx.x >= *ws.num_tiles) return;
  const int e = ws.tile_expert[blockIdx.x];
  const int row0 = ws.tile_row[blockIdx.x];
  const int row_end = ws.expert_offsets[e + 1];
  const int kdim = GATED ? p.H : p.I;
  const int nout = GATED ? p.I : p.H;
  const int n0 = blockIdx.y * kF32Tile;

  // Loader: thread copies 4 consecutive k of one row of A and of each B half.
  const int lr = threadIdx.x / 4, lk = (threadIdx.x % 4) * 4;
  const int arow = row0 + lr;
  const bool a_ok = arow < row_end;
  const float* a_ptr = a_src + (size_t)(!a_ok ? 0 : GATED ? ws.perm_entry[arow] / p.K : arow) * kdim;
  const bool b_ok = n0 + lr < nout;
  const float* b_ptr[2];
  for (int h = 0; h < (GATED ? 2 : 1); ++h)
    b_ptr[h] = w + ((size_t)e * (GATED ? 2 * p.I : p.H) +
                    (GATED ? gate_up_row(p, b_ok ? n0 + lr : 0, h) : (b_ok ? n0 + lr : 0))) * kdim;

  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[GATED ? 2 : 1][4][4] = {};
  for (int k0 = 0; k0 < kdim; k0 += kF32BK) {
    const bool k_ok = k0 + lk < kdim;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 av = a_ok && k_ok ? *reinterpret_cast<const float4*>(a_ptr + k0 + lk) : zero;
    as[lk + 0][lr] = av.x; as[lk + 1][lr] = av.y; as[lk + 2][lr] = av.z; as[lk + 3][lr] = av.w;
#pragma unroll
    for (int h = 0; h < (GATED ? 2 : 1); ++h) {
      const float4 bv = b_ok && k_ok ? *reinterpret_cast<const float4*>(b_ptr[h] + k0 + lk) : zero;
      bs[h][lk + 0][lr] = bv.x; bs[h][lk + 1][lr] = bv.y; bs[h][lk + 2][lr] = bv.z; bs[h][lk + 3][lr] = bv.w;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kF32BK; ++k) {
      const float4 a4 = *reinterpret_cast<const float4*>(&as[k][ty * 4]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
      for (int h = 0; h < (GATED ? 2 : 1); ++h) {
        const float4 b4 = *reinterpret_cast<const float4*>(&bs[h][k][tx * 4]);
        const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[h][i][j] = fmaf(a[i], b[j], acc[h][i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty * 4 + i;
    if (row >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + tx * 4 + j;
      if (col >= nout) continue;
      c_out[(size_t)row * nout + col] = GATED ? silu_mul(acc[0][i][j], acc[GATED ? 1 : 0][i][j])
                                              : acc[0][i][j];
    }
  }
}

void launch_gemm_f32(const Problem& p, const void* a, const void* w, void* c, const Workspace& ws,
                     bool gated, cudaStream_t s) {
  const dim3 grid(max_tiles(p, kF32Tile), ceil_div(gated ? p.I : p.H, kF32Tile));
  if (gated)
    grouped_gemm_f32_kernel<true><<<grid, 256, 0, s>>>(p, static_cast<const float*>(a),
                                                       static_cast<const float*>(w), static_cast<float*>(c), ws);
  else
    grouped_gemm_f32_kernel<false><<<grid, 256, 0, s>>>(p, static_cast<const float*>(a),
                                                        static_cast<const float*>(w), static_cast<float*>(c), ws);
}

}  // namespace moe
