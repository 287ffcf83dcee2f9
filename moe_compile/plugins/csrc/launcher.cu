// The C ABI (fused_moe.h): argument checks, workspace carving, and the choice of path.
//
//   router_logits [T,E] f32                 hidden [T,H]
//        |                                      |
//   route (warp/token) --> topk_ids, topk_w     |
//        |                                      |
//   permute: count | scan -> tile table | place (stable, no host sync)
//        |                                      |
//        +--- decode: T <= 16 (16-bit weights) or 4 (fp32) ---------------------+
//        |  route+permute fused in 1 block (T = 1: inside the FMA gate/up GEMV)   |
//        |  gate_up: stream each chosen expert's [2I,H] once -> act             |
//        |  down+sum: stream [H,I] once, weight, sum per token -> out           |
//        |  16-bit: tensor-core GEMV (decode_mma.cu); fp32: FMA GEMV (decode.cu)|
//        |                                                                      |
//        +--- otherwise (prefill) ------------------------------------------+
//           gemm gate_up (rows gathered via perm_entry, silu*up epilogue) -> act [P,I]
//           gemm down                                                     -> y   [P,H]
//           unpermute: out[t] = sum_k w[t,k] y[pos(t,k)], fixed k order   -> out [T,H]
//
//   quantized experts (moe_compile_forward_quantized): the decode path's tensor-core kernels read the codes
//   (dequantized in registers); elsewhere the layer's experts are dequantized into the workspace first
//
//   shared expert: T <= 16 (16-bit) or 8 (fp32), more tiles and items of the decode kernels (after the
//   grouped GEMM: their own two launches, added to out); beyond, a one-expert problem -> y_s;
//   out += g_t * y_s
#include <stdio.h>
#include <stdlib.h>

#include "common.cuh"
#include "kernels.h"

namespace moe {

// 16-bit weights decode on tensor cores (decode_mma.cu), fp32 ones on the FMA GEMV (decode.cu).
// H200, A2.7B shape, fp16: the tensor-core kernels won at every T from 1 to 16 (T = 8: 146 against
// 178 µs, and against 160 on the grouped GEMM; docs/FUSED_MOE.md), so they take T up to 16.
bool use_mma(const Problem& p) { return p.dtype != MOE_DTYPE_F32; }

// T at or below which the decode kernels run: kDecodeMaxTokens on tensor cores, kFmaDecodeTokens
// on the FMA GEMV, or MOE_COMPILE_DECODE_MAX_TOKENS (0..kDecodeMaxTokens; read per call, so that one
// process can sweep the crossover).
int decode_max_tokens(const Problem& p) {
  const char* env = getenv("MOE_COMPILE_DECODE_MAX_TOKENS");
  const int n = env ? atoi(env) : use_mma(p) ? kDecodeMaxTokens : kFmaDecodeTokens;
  return n < 0 ? 0 : n > kDecodeMaxTokens ? kDecodeMaxTokens : n;
}

bool use_decode_path(const Problem& p) { return p.T <= decode_max_tokens(p); }

// Tokens up to which the shared expert streams through the decode kernels.
int shared_stream_tokens(const Problem& p) { return use_mma(p) ? kDecodeMaxTokens : kSharedFmaTokens; }

int gemm_tile_m(const Problem& p) {
  if (use_decode_path(p)) return kDecodeMaxTokens;  // one tile per active expert
  if (p.dtype == MOE_DTYPE_F32) return 64;
  return p.P >= 256 * p.E ? 128 : 64;  // big tiles only when experts fill them
}

int max_tiles(const Problem& p, int tile_m) { return p.P / tile_m + (p.E < p.P ? p.E : p.P); }

namespace {

thread_local char g_cuda_error[256] = "";

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

size_t dtype_bytes(int d) { return d == MOE_DTYPE_F32 ? 4 : 2; }

// Hands out 256-byte aligned pieces from base in order (base nullptr: only counts the bytes).
struct Carver {
  char* base;
  size_t off = 0;
  char* take(size_t bytes) {
    char* ptr = base ? base + off : nullptr;
    off += align_up(bytes);
    return ptr;
  }
};

// Lays the pieces out from base (nullptr = only count bytes).
size_t carve(const Problem& p, char* base, Workspace* ws) {
  const int tile_m = gemm_tile_m(p);
  const size_t chunks = ceil_div(p.P, kPermuteChunk);
  Carver c{base};
  auto take = [&](size_t bytes) { return c.take(bytes); };
  Workspace w;
  w.topk_ids = reinterpret_cast<int32_t*>(take(4 * p.P));
  w.topk_w = reinterpret_cast<float*>(take(4 * p.P));
  w.chunk_counts = reinterpret_cast<int32_t*>(take(4 * chunks * p.E));
  w.expert_offsets = reinterpret_cast<int32_t*>(take(4 * (p.E + 1)));
  w.tile_expert = reinterpret_cast<int32_t*>(take(4 * max_tiles(p, tile_m)));
  w.tile_row = reinterpret_cast<int32_t*>(take(4 * max_tiles(p, tile_m)));
  w.num_tiles = reinterpret_cast<int32_t*>(take(4));
  w.perm_entry = reinterpret_cast<int32_t*>(take(4 * p.P));
  w.entry_pos = reinterpret_cast<int32_t*>(take(4 * p.P));
  w.act = take(dtype_bytes(p.dtype) * p.P * p.I);
  w.y = !use_decode_path(p) ? take(dtype_bytes(p.dtype) * p.P * p.H) : nullptr;
  if (ws) *ws = w;
  return c.off;
}

// The shared expert beside the routed problem p. Up to shared_stream_tokens: inside the decode kernels
// (needs only its activation rows). Otherwise a problem of its own, one expert that every token
// picks with weight 1 (softmax of one logit, zeros here), run into y, then added.
struct SharedPlan {
  bool gemv;
  Problem p;           // the one-expert problem (not gemv)
  float* zero_logits;  // [T]
  void* y;             // [T, H]
  Workspace ws;        // of the one-expert problem
  Shared kernels;      // what the GEMV kernels read
};

size_t carve_shared(const Problem& p, const moe_shared_expert& s, char* base, SharedPlan* plan) {
  SharedPlan sp{};
  sp.gemv = p.T <= shared_stream_tokens(p);
  Carver c{base};
  auto take = [&](size_t bytes) { return c.take(bytes); };
  sp.kernels = Shared{s.gate_up, s.down, s.gate_logits, (int)s.intermediate,
                      s.gate_up_layout == MOE_GATE_UP_INTERLEAVED, nullptr};
  if (sp.gemv) {
    sp.kernels.act = take(dtype_bytes(p.dtype) * p.T * s.intermediate);
  } else {
    sp.p = p;
    sp.p.I = (int)s.intermediate;
    sp.p.E = 1;
    sp.p.K = 1;
    sp.p.P = p.T;
    sp.p.routing = moe_routing{MOE_ROUTING_SOFTMAX_TOPK, 1, 0, 1, 1, 1.0f};
    sp.p.gate_up_interleaved = sp.kernels.interleaved;
    sp.zero_logits = reinterpret_cast<float*>(take(4 * p.T));
    sp.y = take(dtype_bytes(p.dtype) * p.T * p.H);
    c.off += carve(sp.p, base ? base + c.off : nullptr, &sp.ws);
  }
  if (plan) *plan = sp;
  return c.off;
}

// Sizes and layout only (what workspace sizing needs); forward also wants the pointers.
bool valid_shared_shape(const moe_shared_expert* s) {
  if (!s) return true;
  if (s->intermediate < 8 || s->intermediate % 8 || s->intermediate > INT32_MAX) return false;
  return s->gate_up_layout == MOE_GATE_UP_CONCATENATED || s->gate_up_layout == MOE_GATE_UP_INTERLEAVED;
}

bool valid_shared(const moe_shared_expert* s) { return valid_shared_shape(s) && (!s || (s->gate_up && s->down)); }

size_t total_bytes(const Problem& p, const moe_shared_expert* s) {
  return carve(p, nullptr, nullptr) + (s ? carve_shared(p, *s, nullptr, nullptr) : 0);
}

bool valid_routing(const moe_routing& r, int E) {
  if (r.top_k < 1 || r.top_k > 32 || r.top_k > E) return false;
  if (r.kind == MOE_ROUTING_SOFTMAX_TOPK) return true;
  if (r.kind != MOE_ROUTING_SIGMOID_GROUP_TOPK) return false;
  if (r.n_group < 1 || r.n_group > 32 || E % r.n_group) return false;
  if (r.topk_group < 1 || r.topk_group > r.n_group) return false;
  return r.top_k <= r.topk_group * (E / r.n_group);
}

// Checks arguments and fills the problem description; false = MOE_ERR_INVALID_ARGUMENT.
bool make_problem(const moe_shape* s, const moe_routing* r, Problem* p) {
  if (!s || !r) return false;
  if (s->num_tokens < 0 || s->num_tokens * (int64_t)r->top_k > INT32_MAX) return false;
  if (s->hidden < 8 || s->hidden % 8 || s->intermediate < 8 || s->intermediate % 8) return false;
  if (s->hidden > INT32_MAX || s->intermediate > INT32_MAX) return false;
  if (s->num_experts < 1 || s->num_experts > kMaxExperts) return false;
  if (s->dtype != MOE_DTYPE_F32 && s->dtype != MOE_DTYPE_F16 && s->dtype != MOE_DTYPE_BF16) return false;
  if (!valid_routing(*r, (int)s->num_experts)) return false;
  if (s->gate_up_layout != MOE_GATE_UP_CONCATENATED && s->gate_up_layout != MOE_GATE_UP_INTERLEAVED) return false;
  p->T = (int)s->num_tokens;
  p->H = (int)s->hidden;
  p->I = (int)s->intermediate;
  p->E = (int)s->num_experts;
  p->K = r->top_k;
  p->P = p->T * p->K;
  p->dtype = static_cast<moe_dtype>(s->dtype);
  p->routing = *r;
  p->gate_up_interleaved = s->gate_up_layout == MOE_GATE_UP_INTERLEAVED;
  return true;
}

int check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return MOE_OK;
  snprintf(g_cuda_error, sizeof g_cuda_error, "CUDA error: %s", cudaGetErrorString(err));
  return MOE_ERR_CUDA;
}

}  // namespace
}  // namespace moe

using namespace moe;

extern "C" size_t moe_compile_workspace_size(const moe_shape* shape, const moe_routing* routing,
                                             const moe_shared_expert* shared) {
  Problem p;
  if (!make_problem(shape, routing, &p)) return 0;
  if (!valid_shared_shape(shared)) return 0;
  return total_bytes(p, shared);
}

extern "C" int moe_compile_route(const moe_shape* shape, const moe_routing* routing,
                                 const float* router_logits, const float* expert_bias,
                                 int32_t* topk_ids, float* topk_weights, void* cuda_stream) {
  Problem p;
  if (!make_problem(shape, routing, &p)) return MOE_ERR_INVALID_ARGUMENT;
  if (p.T == 0) return MOE_OK;
  if (!router_logits || !topk_ids || !topk_weights) return MOE_ERR_INVALID_ARGUMENT;
  launch_route(p, router_logits, expert_bias, topk_ids, topk_weights,
               static_cast<cudaStream_t>(cuda_stream));
  return check_launch();
}

namespace moe {
namespace {

// The decode kernels' two steps: tensor cores for 16-bit weights, the FMA GEMV for fp32.
void decode_gate_up(const Problem& p, const void* x, const void* w, const Workspace& ws, const Shared& sh, bool routed,
                    cudaStream_t s) {
  if (use_mma(p)) launch_mma_gate_up(p, x, w, ws, sh, routed, s);
  else launch_decode_gate_up(p, x, w, ws, sh, routed, s);
}

void decode_down_sum(const Problem& p, const void* w, const Workspace& ws, const Shared& sh, bool routed, void* out,
                     cudaStream_t s) {
  if (use_mma(p)) launch_mma_down_sum(p, w, ws, sh, routed, out, s);
  else launch_decode_down_sum(p, w, ws, sh, routed, out, s);
}

void run_routed(const Problem& p, const void* hidden, const float* router_logits, const float* expert_bias,
                const void* gate_up, const void* down, void* out, const Workspace& ws, const Shared& shared,
                cudaStream_t s) {
  const int tile_m = gemm_tile_m(p);
  if (use_decode_path(p) && p.T == 1) {  // gate/up on the FMA GEMV, which routes inside
    launch_decode1_route_gate_up(p, hidden, router_logits, expert_bias, gate_up, ws, shared, s);
    decode_down_sum(p, down, ws, shared, true, out, s);
  } else if (use_decode_path(p)) {
    launch_route_permute_small(p, router_logits, expert_bias, ws, tile_m, s);
    decode_gate_up(p, hidden, gate_up, ws, shared, true, s);
    decode_down_sum(p, down, ws, shared, true, out, s);
  } else {
    launch_route(p, router_logits, expert_bias, ws.topk_ids, ws.topk_w, s);
    launch_permute(p, ws, tile_m, s);
    launch_gemm_gate_up(p, hidden, gate_up, ws, tile_m, s);
    launch_gemm_down(p, down, ws, tile_m, s);
    launch_unpermute(p, ws, out, s);
    if (shared.gate_up) {  // the decode kernels again, for the shared expert alone, added to out
      decode_gate_up(p, hidden, nullptr, ws, shared, false, s);
      decode_down_sum(p, nullptr, ws, shared, false, out, s);
    }
  }
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// The routed problem's workspace and the shared expert's plan (if any), laid out from base as total_bytes counts them.
struct Layout {
  Workspace ws;
  SharedPlan plan{};
};

Layout lay_out(const Problem& p, const moe_shared_expert* shared, char* base) {
  Layout l;
  const size_t routed_bytes = carve(p, base, &l.ws);
  if (shared) carve_shared(p, *shared, base + routed_bytes, &l.plan);
  return l;
}

// moe_compile_forward's work on checked arguments: the routed experts, then the shared expert (inside their
// launches, or apart as a one-expert problem), from the workspace at base.
void forward_float(const Problem& p, const moe_shared_expert* shared, const void* hidden, const float* router_logits,
                   const float* expert_bias, const void* gate_up, const void* down, void* out, char* base,
                   cudaStream_t s) {
  const auto [ws, plan] = lay_out(p, shared, base);
  run_routed(p, hidden, router_logits, expert_bias, gate_up, down, out, ws, plan.gemv ? plan.kernels : Shared{}, s);
  if (shared && !plan.gemv) {
    cudaMemsetAsync(plan.zero_logits, 0, sizeof(float) * p.T, s);
    run_routed(plan.p, hidden, plan.zero_logits, nullptr, shared->gate_up, shared->down, plan.y, plan.ws, Shared{}, s);
    launch_add_shared(p, plan.y, shared->gate_logits, out, s);
  }
}

}  // namespace
}  // namespace moe

extern "C" int moe_compile_forward(const moe_shape* shape, const moe_routing* routing,
                                   const moe_shared_expert* shared, const void* hidden,
                                   const float* router_logits, const float* expert_bias, const void* gate_up,
                                   const void* down, void* out, void* workspace, size_t workspace_bytes,
                                   void* cuda_stream) {
  Problem p;
  if (!make_problem(shape, routing, &p) || !valid_shared(shared)) return MOE_ERR_INVALID_ARGUMENT;
  if (p.T == 0) return MOE_OK;
  if (!hidden || !router_logits || !gate_up || !down || !out || !workspace)
    return MOE_ERR_INVALID_ARGUMENT;
  if (workspace_bytes < total_bytes(p, shared)) return MOE_ERR_WORKSPACE_TOO_SMALL;
  forward_float(p, shared, hidden, router_logits, expert_bias, gate_up, down, out, static_cast<char*>(workspace),
                static_cast<cudaStream_t>(cuda_stream));
  return check_launch();
}

namespace moe {
namespace {

bool valid_quantized(const moe_quantized_experts* q, const Problem& p, const moe_shared_expert* shared) {
  if (!q || (q->bits != 4 && q->bits != 8) || !valid_shared_shape(shared)) return false;
  // a lane's 16-byte load of codes (32 or 16 weights) stays inside one block, and the decode kernels' slices of
  // H and I (multiples of 128) start on one
  const int b = q->block_size;
  return (b == 32 || b == 64 || b == 128) && p.H % b == 0 && p.I % b == 0 && (!shared || shared->intermediate % b == 0);
}

// The tensor-core decode kernels read the codes; every other size runs on dequantized weights.
bool reads_codes(const Problem& p) { return use_mma(p) && use_decode_path(p); }

// The dequantized weights, from base (nullptr = only count bytes): the layer's experts, gate_up [E, 2I, H] then
// down [E, H, I], then the shared expert's gate_up [2I_s, H] and down [H, I_s] (with one).
struct Dequantized {
  char *gate_up, *down, *shared_gate_up = nullptr, *shared_down = nullptr;
};

size_t carve_dequantized(const Problem& p, const moe_shared_expert* shared, char* base, Dequantized* out) {
  Carver c{base};
  Dequantized d;
  const size_t element = dtype_bytes(p.dtype);
  d.gate_up = c.take(element * p.E * 2 * p.I * p.H);
  d.down = c.take(element * p.E * p.H * p.I);
  if (shared) {
    d.shared_gate_up = c.take(element * 2 * shared->intermediate * p.H);
    d.shared_down = c.take(element * p.H * shared->intermediate);
  }
  if (out) *out = d;
  return c.off;
}

}  // namespace
}  // namespace moe

extern "C" size_t moe_compile_workspace_size_quantized(const moe_shape* shape, const moe_routing* routing,
                                                       const moe_quantized_experts* quant,
                                                       const moe_shared_expert* shared) {
  Problem p;
  if (!make_problem(shape, routing, &p) || !valid_quantized(quant, p, shared)) return 0;
  return total_bytes(p, shared) + (reads_codes(p) ? 0 : carve_dequantized(p, shared, nullptr, nullptr));
}

extern "C" int moe_compile_forward_quantized(const moe_shape* shape, const moe_routing* routing,
                                             const moe_quantized_experts* quant, const moe_shared_expert* shared,
                                             const void* hidden, const float* router_logits,
                                             const float* expert_bias, const void* gate_up, const void* down,
                                             void* out, void* workspace, size_t workspace_bytes, void* cuda_stream) {
  Problem p;
  if (!make_problem(shape, routing, &p) || !valid_quantized(quant, p, shared) || !valid_shared(shared))
    return MOE_ERR_INVALID_ARGUMENT;
  if (p.T == 0) return MOE_OK;
  if (!hidden || !router_logits || !gate_up || !down || !out || !workspace || !quant->gate_up_scales ||
      !quant->down_scales || (shared && (!quant->shared_gate_up_scales || !quant->shared_down_scales)))
    return MOE_ERR_INVALID_ARGUMENT;
  if (workspace_bytes < moe_compile_workspace_size_quantized(shape, routing, quant, shared))
    return MOE_ERR_WORKSPACE_TOO_SMALL;
  char* base = static_cast<char*>(workspace);
  const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
  if (reads_codes(p)) {  // the shared expert, if any, streams inside the same launches (T <= shared_stream_tokens)
    const auto [ws, plan] = lay_out(p, shared, base);
    Shared sh = shared ? plan.kernels : Shared{};
    sh.gate_up_scales = quant->shared_gate_up_scales;
    sh.down_scales = quant->shared_down_scales;
    const QuantWeights w{gate_up, quant->gate_up_scales, down, quant->down_scales, quant->bits, quant->block_size};
    if (p.T > 1) launch_route_permute_small(p, router_logits, expert_bias, ws, gemm_tile_m(p), s);  // T = 1: both launches route
    launch_mma_gate_up_quantized(p, hidden, w, ws, sh, Route{router_logits, expert_bias}, s);
    launch_mma_down_sum_quantized(p, w, ws, sh, Route{router_logits, expert_bias}, out, s);
  } else {
    Dequantized d;
    carve_dequantized(p, shared, base + total_bytes(p, shared), &d);
    const int bits = quant->bits, block = quant->block_size;
    launch_dequantize(gate_up, quant->gate_up_scales, (int64_t)p.E * 2 * p.I, p.H, bits, block, p.dtype, d.gate_up, s);
    launch_dequantize(down, quant->down_scales, (int64_t)p.E * p.H, p.I, bits, block, p.dtype, d.down, s);
    moe_shared_expert dense{};
    if (shared) {
      const int64_t I_s = shared->intermediate;
      launch_dequantize(shared->gate_up, quant->shared_gate_up_scales, 2 * I_s, p.H, bits, block, p.dtype,
                        d.shared_gate_up, s);
      launch_dequantize(shared->down, quant->shared_down_scales, p.H, I_s, bits, block, p.dtype, d.shared_down, s);
      dense = *shared;
      dense.gate_up = d.shared_gate_up;
      dense.down = d.shared_down;
    }
    forward_float(p, shared ? &dense : nullptr, hidden, router_logits, expert_bias, d.gate_up, d.down, out, base, s);
  }
  return check_launch();
}

extern "C" int moe_compile_streams_shared(const moe_shape* shape) {
  if (!shape) return 0;
  Problem p{};
  p.T = (int)shape->num_tokens;
  p.dtype = static_cast<moe_dtype>(shape->dtype);
  return p.T <= shared_stream_tokens(p) && p.T <= decode_max_tokens(p);
}

extern "C" const char* moe_compile_status_string(int status) {
  switch (status) {
    case MOE_OK: return "ok";
    case MOE_ERR_INVALID_ARGUMENT:
      return "invalid argument (H and I multiples of 8, 1 <= E <= 1024, 1 <= top_k <= min(32, E), "
             "sigmoid mode: E % n_group == 0, n_group <= 32, topk_group <= n_group, "
             "top_k <= topk_group * E / n_group; non-null pointers)";
    case MOE_ERR_WORKSPACE_TOO_SMALL: return "workspace smaller than moe_compile_workspace_size()";
    case MOE_ERR_CUDA: return g_cuda_error;
    default: return "unknown status";
  }
}
