// C ABI of the fused MoE kernels: the one contract shared by the torch binding (ctypes) and,
// later, the TensorRT plugin. Raw device pointers in, no allocation inside: the caller owns the
// workspace, sized by moe_compile_workspace_size().
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MOE_DTYPE_F32 = 0, MOE_DTYPE_F16 = 1, MOE_DTYPE_BF16 = 2 } moe_dtype;

typedef enum {
  // probs = softmax(logits); top-k by logit; weights = probs of the chosen (optionally renormalised)
  MOE_ROUTING_SOFTMAX_TOPK = 0,
  // DeepSeek-V3: scores = sigmoid(logits); choice = scores + bias; keep topk_group groups by the
  // sum of each group's top-2 choice; top-k over kept experts by choice; weights = scores of the
  // chosen, optionally renormalised
  MOE_ROUTING_SIGMOID_GROUP_TOPK = 1,
} moe_routing_kind;

typedef enum {
  MOE_GATE_UP_CONCATENATED = 0,  // gate_up rows: gate 0..I-1, then up 0..I-1 (transformers 5.x)
  MOE_GATE_UP_INTERLEAVED = 1,   // gate_up rows: g0, u0, g1, u1, ... (com.microsoft:MoE swiglu_fusion=1)
} moe_gate_up_layout;

typedef struct {
  int64_t num_tokens;    // T
  int64_t hidden;        // H, multiple of 8
  int64_t intermediate;  // I, multiple of 8
  int64_t num_experts;   // E, <= 1024
  int32_t dtype;         // moe_dtype of hidden, weights and output
  int32_t gate_up_layout;  // moe_gate_up_layout
} moe_shape;

typedef struct {
  int32_t kind;                  // moe_routing_kind
  int32_t top_k;                 // 1..32
  int32_t renormalize;           // 0/1
  int32_t n_group;               // sigmoid mode: groups (E % n_group == 0, <= 32); 1 = no grouping
  int32_t topk_group;            // sigmoid mode: groups kept
  float routed_scaling_factor;   // multiplies the final weights (1.0 = none)
} moe_routing;

enum {
  MOE_OK = 0,
  MOE_ERR_INVALID_ARGUMENT = 1,
  MOE_ERR_WORKSPACE_TOO_SMALL = 2,
  MOE_ERR_CUDA = 3,  // cudaGetLastError after a launch; see moe_compile_last_cuda_error()
};

// A shared expert that every token also runs (Qwen2-MoE's `shared_expert`, DeepSeek's shared
// experts as one wider expert): out[t] += g_t * down_s(silu(gate_s x_t) * up_s x_t), where
// g_t = sigmoid(gate_logits[t]) (Qwen2-MoE's `shared_expert_gate`), or 1 when gate_logits is NULL.
typedef struct {
  int64_t intermediate;       // I_s, multiple of 8
  int32_t gate_up_layout;     // moe_gate_up_layout of gate_up
  const void* gate_up;        // [2 I_s, H], the routed experts' dtype
  const void* down;           // [H, I_s]
  const float* gate_logits;   // [T] float32, or NULL
} moe_shared_expert;

// Bytes of workspace moe_compile_forward needs for this shape (256-byte aligned pieces); shared
// may be NULL (no shared expert).
size_t moe_compile_workspace_size(const moe_shape* shape, const moe_routing* routing,
                                  const moe_shared_expert* shared);

// out[T,H] = sum_k w_k * down_e(silu(gate_e x) * up_e x), e = the k-th routed expert, plus the
// shared expert's term when shared is not NULL.
//   hidden [T,H], gate_up [E,2I,H] (row order: shape->gate_up_layout), down [E,H,I]: dtype
//   router_logits [T,E] float32; expert_bias [E] float32 or NULL (sigmoid mode only)
// Deterministic: no float atomics; two runs give bitwise-identical outputs.
int moe_compile_forward(const moe_shape* shape, const moe_routing* routing, const moe_shared_expert* shared,
                        const void* hidden, const float* router_logits, const float* expert_bias,
                        const void* gate_up, const void* down, void* out, void* workspace,
                        size_t workspace_bytes, void* cuda_stream);

// Routing alone (the same kernel the forward uses): topk_ids [T,K] int32, topk_weights [T,K] f32.
int moe_compile_route(const moe_shape* shape, const moe_routing* routing,
                      const float* router_logits, const float* expert_bias, int32_t* topk_ids,
                      float* topk_weights, void* cuda_stream);

// dst[r * cols + c] = (float)src[r * src_row_stride + c] for rows x cols elements of moe_dtype
// `dtype` (router logits arrive in the model's dtype, and the ort form packs the shared expert's
// gate logit as column E of the router's). MOE_ERR_CUDA carries no text here: see the launch error.
int moe_compile_to_float(const void* src, int32_t dtype, float* dst, int64_t rows, int64_t cols,
                         int64_t src_row_stride, void* cuda_stream);

// logits[t, e] = sum_h x[t, h] rows[e, h] for e < experts, accumulated in float32 and rounded to `dtype` (as a MatMul
// in that dtype gives it), as float32: x [tokens, hidden] and rows [experts + gate_row, hidden] of moe_dtype `dtype`
// (hidden a multiple of 8, both 16-byte aligned), logits [tokens, experts]. gate_row = 1: the rows' last one is
// Qwen2-MoE's shared-expert gate, whose logit goes to gate[t]. Starts as its stream predecessor's programmatic
// dependent on sm_90+ (common.cuh).
int moe_compile_router_logits(const void* x, const void* rows, int32_t dtype, int64_t tokens, int64_t hidden,
                              int64_t experts, int32_t gate_row, float* logits, float* gate, void* cuda_stream);

// com.microsoft:SkipSimplifiedLayerNormalization (norm.cu) over rows [rows, hidden] of moe_dtype `dtype`: sum = input +
// skip (+ bias [hidden], added first), each addition rounded to the dtype; out = sum * rsqrt(mean(sum^2) + epsilon) *
// gamma [hidden], the mean and the product in float32, rounded once, as ONNX Runtime's CUDA kernel computes them;
// sum_out = sum where not NULL. hidden a multiple of 8, at most 4096 16-byte loads (32768 16-bit elements); every
// pointer 16-byte aligned. Starts as its stream predecessor's programmatic dependent on sm_90+ (common.cuh) and lets
// the next launch start at once: gamma and bias are read before the wait, input and skip after.
int moe_compile_skip_rms_norm(const void* input, const void* skip, const void* bias, const void* gamma, int32_t dtype,
                              int64_t rows, int64_t hidden, float epsilon, void* out, void* sum_out, void* cuda_stream);

// 1 when moe_compile_forward streams a shared expert inside the routed GEMV kernels at this shape (batch-1
// decode and a few tokens), 0 when it runs it apart: a caller with faster GEMMs (cuBLAS through ONNX
// Runtime) then computes it itself, with moe_compile_silu_mul and moe_compile_add_gated.
int moe_compile_streams_shared(const moe_shape* shape);

// act[r, j] = silu(gate_up[r, j]) * gate_up[r, I + j]: gate_up [rows, 2I] (gate columns, then up), act [rows, I].
int moe_compile_silu_mul(const void* gate_up, int32_t dtype, void* act, int64_t rows, int64_t intermediate,
                         void* cuda_stream);

// out[t] += g_t * y[t] for [rows, hidden] (hidden a multiple of 8), g_t = sigmoid(gate_logits[t]) or 1 (NULL).
int moe_compile_add_gated(void* out, const void* y, const float* gate_logits, int32_t dtype, int64_t rows,
                          int64_t hidden, void* cuda_stream);

// Block-quantized experts (weight-only, symmetric, one scale per block of the input axis):
// com.microsoft:QMoE's layout with weights_prepacked = 0, the rows as the float experts hold them.
//   codes: u = q + 2^(bits-1) as uint8, int4 two a byte (the lower nibble first): gate_up [E, 2I, H*bits/8],
//          down [E, H, I*bits/8]; a weight is (u - 2^(bits-1)) * scale of its block
//   scales: gate_up [E, 2I, H/block_size], down [E, H, I/block_size], in the shape's dtype
// A shared expert beside them is quantized the same way (com.microsoft:MatMulNBits' layout, the same bits and
// block): moe_shared_expert's gate_up [2I_s, H*bits/8] and down [H, I_s*bits/8] hold codes, these its scales.
// Decode sizes (16-bit activations, T up to the tensor-core GEMV's 16 tokens) dequantize in registers and
// read each chosen expert's codes (and the shared expert's) once; other sizes dequantize the layer's experts
// into the workspace (E*3*H*I elements of the dtype, plus 3*H*I_s) and run the float path.
typedef struct {
  int32_t bits;                       // 4 or 8
  int32_t block_size;                 // 32, 64 or 128; divides H, I and I_s
  const void* gate_up_scales;         // [E, 2I, H/block_size]
  const void* down_scales;            // [E, H, I/block_size]
  const void* shared_gate_up_scales;  // [2I_s, H/block_size], with a shared expert
  const void* shared_down_scales;     // [H, I_s/block_size]
} moe_quantized_experts;

// Bytes of workspace moe_compile_forward_quantized needs for this shape; 0 on invalid arguments. shared may
// be NULL.
size_t moe_compile_workspace_size_quantized(const moe_shape* shape, const moe_routing* routing,
                                            const moe_quantized_experts* quant, const moe_shared_expert* shared);

// moe_compile_forward with block-quantized experts (gate_up / down: their codes; shared, if not NULL, a
// quantized shared expert: its codes, with quant's shared scales).
int moe_compile_forward_quantized(const moe_shape* shape, const moe_routing* routing,
                                  const moe_quantized_experts* quant, const moe_shared_expert* shared,
                                  const void* hidden, const float* router_logits, const float* expert_bias,
                                  const void* gate_up, const void* down, void* out, void* workspace,
                                  size_t workspace_bytes, void* cuda_stream);

// y [M, N] = x [M, K] W^T (+ bias [N]) for a block-quantized W as com.microsoft:MatMulNBits holds it (symmetric,
// no zero points): codes [N, K*bits/8] (its [N, K/block, block*bits/8]), scales [N, K/block]; x, scales, bias
// (NULL: none) and y of `dtype`, 16-bit only (tensor cores, quant_matmul.cu). K a multiple of block_size; x and
// codes 16-byte aligned. It reads the codes once per 16 rows of x: beyond decode sizes a caller with a GEMM
// dequantizes the weight (moe_compile_dequantize) and runs that. MOE_ERR_CUDA carries no text here: see the launch
// error.
int moe_compile_quantized_matmul(const void* x, const void* codes, const void* scales, const void* bias, void* y,
                                 int64_t M, int64_t K, int64_t N, int32_t bits, int32_t block_size, int32_t dtype,
                                 void* cuda_stream);

// out [rows, K] of `dtype` = (u - 2^(bits-1)) * scale, from codes [rows, K*bits/8] and scales [rows, K/block_size]
// in the layouts above. K a multiple of block_size; codes and out 16-byte aligned. MOE_ERR_CUDA carries no text.
int moe_compile_dequantize(const void* codes, const void* scales, int64_t rows, int64_t K, int32_t bits,
                           int32_t block_size, int32_t dtype, void* out, void* cuda_stream);

// com.microsoft:GroupQueryAttention's decode step (decode_attention.cu): one new token a row b of `batch`, at
// position seqlens_k[b] (device int32, ONNX Runtime's total length - 1). query: row b's num_heads heads at
// query + b q_stride (elements); key/value: its kv_heads heads at key/value + b kv_stride (packed QKV: pointers
// into one row). Rotary (rotary_half > 0): the first 2 rotary_half dims of q and the new k rotate in halves by
// cos/sin_cache[position, rotary_half]. The new k and v are written into present_key/value [batch, kv_heads,
// max_seq, head_dim] at the position (past_* copied there first where they are other buffers; NULL or the same:
// in place), then out [batch, num_heads head_dim] = softmax(scale q K^T) V over positions 0..seqlens_k[b].
// 16-bit dtypes; head_dim 16, 32, 64, 128 or 256; num_heads / kv_heads 1, 2, 4, 8 or 16 (..._supported). Launches
// whose grids depend on batch, kv_heads, head_dim and max_seq only: a CUDA graph replays them at any length. The
// cache is cut into splits whose partial softmaxes are merged: with counters (batch x kv_heads int32 that hold zeros,
// from moe_compile_attention_counters) by the last split of each (row, head) to finish, which sets its counter back
// to zero, in one launch; with NULL by a second launch. Calls that may run at once (other streams) need their own
// counters.
int moe_compile_decode_attention_supported(int64_t num_heads, int64_t kv_heads, int64_t head_dim);
size_t moe_compile_decode_attention_workspace_size(int64_t batch, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                                   int64_t max_seq);
int moe_compile_decode_attention(const void* query, const void* key, const void* value, int64_t q_stride,
                                 int64_t kv_stride, const void* past_key, const void* past_value, void* present_key,
                                 void* present_value, const int32_t* seqlens_k, const void* cos_cache,
                                 const void* sin_cache, int64_t rotary_half, int64_t batch, int64_t num_heads,
                                 int64_t kv_heads, int64_t head_dim, int64_t max_seq, float scale, int32_t dtype,
                                 void* out, void* workspace, size_t workspace_bytes, int32_t* counters,
                                 void* cuda_stream);
// `count` int32 zeros on the current device for moe_compile_decode_attention, set on `cuda_stream`; *counters stays
// NULL while that stream captures a CUDA graph (an allocation would end the capture): calls then take two launches.
int moe_compile_attention_counters(int64_t count, void* cuda_stream, int32_t** counters);
void moe_compile_free_attention_counters(int32_t* counters);

// The k largest of each row of x [rows, n] (float32), best first, ties to the lower index (ONNX TopK's order; NaN
// ranks first): values [rows, k] float32 and indices [rows, k] int64, and argmax [rows] int64 (ONNX ArgMax's first
// maximum; NULL: not written) = indices[:, 0]. 1 <= k <= 64, k <= n < 2^31, rows <= 65535. Two launches (top_k.cu)
// whose grids depend on rows and n only (a CUDA graph replays them); the workspace holds per-slice candidates.
size_t moe_compile_top_k_workspace_size(int64_t rows, int64_t n);
int moe_compile_top_k(const float* x, int64_t rows, int64_t n, int64_t k, float* values, int64_t* indices,
                      int64_t* argmax, void* workspace, size_t workspace_bytes, void* cuda_stream);

// Text of a status code; for MOE_ERR_CUDA, the CUDA error of the failing launch.
const char* moe_compile_status_string(int status);

#ifdef __cplusplus
}
#endif
