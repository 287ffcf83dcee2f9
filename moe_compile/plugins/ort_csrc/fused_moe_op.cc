// ONNX Runtime custom-op library: `moe_compile:FusedMoE` on the CUDA execution provider, the fused
// MoE kernels (../csrc, C ABI fused_moe.h) called on ORT's compute stream. Written against
// onnxruntime's C API only (onnxruntime_c_api.h from the release archive's include/), so one
// library loads into every onnxruntime-gpu from 1.18 on.
//
//   FusedMoE(input [..., H], router_logits [..., E (+1)], fc1 [E, 2I, H] (g0, u0, g1, u1, ...), fc2 [E, H, I],
//            shared_fc1 [2I_s, H] (gate rows, then up rows), shared_fc2 [H, I_s])   the last two optional
//     k, normalize_routing_weights, shared_gate, router_rows  ->  output [..., H]
//
// The routed part is com.microsoft:MoE's with activation_type=swiglu, swiglu_fusion=1, alpha 1,
// beta 0, no biases. With shared_fc1/shared_fc2 every token also runs the shared expert, weighted
// by sigmoid(router_logits[..., E]) when shared_gate = 1 (Qwen2-MoE's shared_expert_gate, packed as
// one more router column), else by 1. With router_rows = 1 (both ops), input 1 is the router's weight rows
// [E (+1), H] instead, and the op computes the logits from the input itself (fused_moe.h: moe_compile_router_logits):
// the router MatMul that the swap folds in. The ort form's graph for CUDA (runtime/ort_kernels.py) swaps
// MoE nodes, and the shared expert around them, for this one. No allocation outside ORT: the
// workspace comes from the kernel context's allocator, so CUDA-graph capture sees the same
// addresses ORT's own kernels get.
//
// Where the kernels would not stream the shared expert inside the routed launches (prefill, batches
// past 16 tokens; fp32 past 4), the op runs it as two of ONNX Runtime's own CUDA Gemms (cuBLAS,
// invoked through the C API's CreateOp/InvokeOp) around our SiLU and gated-add kernels: our FMA GEMV
// and grouped GEMM took 80-100 us a layer for it at 8-128 tokens where cuBLAS takes 45 (H200, A2.7B
// shape); our tensor-core GEMV takes ~15 inside the routed launches up to 16 tokens.
//
//   FusedQMoE(input [..., H], router_logits [..., E (+1)], fc1 codes uint8 [E, 2I, H*bits/8], fc1 scales [E, 2I, H/block],
//             fc2 codes uint8 [E, H, I*bits/8], fc2 scales [E, H, I/block],
//             shared_fc1 codes uint8 [2I_s, H/block, block*bits/8], shared_fc1 scales [2I_s, H/block],
//             shared_fc2 codes uint8 [H, I_s/block, block*bits/8], shared_fc2 scales [H, I_s/block])  the last four optional
//     k, normalize_routing_weights, expert_weight_bits, block_size, shared_gate, router_rows  ->  output [..., H]
//
// com.microsoft:QMoE's routed part (weights_prepacked = 0, symmetric blocks, no zero points, SwiGLU as
// above) on our kernels, and the shared expert beside it as com.microsoft:MatMulNBits holds it (the same bits
// and block, gate rows then up rows): decode sizes read the codes (dequantized in registers), others
// dequantize the layer's experts into the workspace first (fused_moe.h: moe_compile_forward_quantized).
//
//   MatMulNBits(A [..., K], B codes uint8 [N, K/block, block*bits/8], scales [N, K/block], bias [N])  bias optional
//     K, N, bits, block_size  ->  Y [..., N]
//
// com.microsoft:MatMulNBits without zero points or group index, on our tensor-core kernels for 16-bit A (fused_moe.h:
// moe_compile_quantized_matmul): a quantized build's attention projections and LM head, the bias added in the same
// launch. Past 16 rows (prefill) the weight is dequantized into the workspace for ONNX Runtime's Gemm.
//
//   GroupQueryAttention(query [B, S, (N + 2 KV) D] packed, or [B, S, N D] with key and value [B, S, KV D],
//                       past_key, past_value [B, KV, max_seq, D], seqlens_k int32 [B], total_sequence_length (host),
//                       cos_cache, sin_cache [positions, R/2])   num_heads, kv_num_heads, scale, do_rotary
//     -> output [B, S, N D], present_key, present_value (past's buffers where the caller binds them so)
//
// com.microsoft:GroupQueryAttention with the KV cache a shared buffer and half-split rotary (rotary_interleaved 0,
// no softcap, window, sinks or position ids): one new token a row (decode) on our kernels (fused_moe.h:
// moe_compile_decode_attention, one launch where ONNX Runtime's takes five: the splits merged by the last to finish,
// on counters the kernel keeps a stream); more (prefill) on ONNX Runtime's own kernel, invoked through the C API.
//
//   SkipSimplifiedLayerNormalization(input [..., H], skip [..., H] (input's shape), gamma [H], bias [H])   bias optional
//     epsilon  ->  output [..., H], mean, inv_std_var (never computed: a node that asks for them fails),
//                  input_skip_bias_sum [..., H]   the last three optional
//
// com.microsoft:SkipSimplifiedLayerNormalization for 16-bit types, output positions as ONNX Runtime's: one launch of
// ours (fused_moe.h: moe_compile_skip_rms_norm) that lets the next launch start at once, where ONNX Runtime's norm
// kept the quantized q/k/v matmul after it from loading its weights early. input_skip_bias_sum is written only where
// the node has it.
//
//   TopK(X float [..., n])   k  ->  values float [..., k], indices int64 [..., k], argmax int64 [...]   argmax optional
//
// The sampler at the end of an ort-form graph, ONNX TopK (largest, sorted, last axis, K a constant up to 64) and
// the ArgMax over the same logits (last axis, keepdims 0) in one op: two launches of ours (fused_moe.h:
// moe_compile_top_k), where ONNX Runtime's TopK and ArgMax take five.
#include <math.h>
#include <stdio.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "fused_moe.h"
#include "onnxruntime_c_api.h"

namespace {

constexpr uint32_t kApiVersion = 18;  // KernelContext_GetAllocator is the newest call used
const OrtApi* g_api = nullptr;

// msg starts with the op's name
OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, ("moe_compile:" + msg).c_str()); }

#define ORT_TRY(expr)                       \
  do {                                      \
    if (OrtStatus* status_ = (expr)) return status_; \
  } while (0)

struct TensorView {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  void* data = nullptr;
  int64_t leading() const {  // product of all dims but the last
    int64_t n = 1;
    for (size_t i = 0; i + 1 < dims.size(); ++i) n *= dims[i];
    return n;
  }
};

OrtStatus* view(const OrtValue* value, TensorView* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_TRY(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &out->type);
  if (!status) status = g_api->GetDimensionsCount(info, &rank);
  if (!status) {
    out->dims.resize(rank);
    status = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (status) return status;
  return g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &out->data);
}

// The op's inputs 0 .. n - 1 as views (values[i] stays null where an optional input is absent); fails naming `op`
// when one of the first `required` is absent.
OrtStatus* get_inputs(OrtKernelContext* ctx, const char* op, size_t n, size_t required, const OrtValue** values,
                      TensorView* const* views) {
  size_t count = 0;
  ORT_TRY(g_api->KernelContext_GetInputCount(ctx, &count));
  for (size_t i = 0; i < n && i < count; ++i) {
    ORT_TRY(g_api->KernelContext_GetInput(ctx, i, &values[i]));
    if (values[i]) ORT_TRY(view(values[i], views[i]));
    else if (i < required) return fail(std::string(op) + ": input " + std::to_string(i) + " is missing");
  }
  return nullptr;
}

struct Kernel {
  int64_t top_k = 0;
  int64_t normalize = 0;
  int64_t shared_gate = 0;
  int64_t router_rows = 0;  // input 1 is the router's weight rows [E (+1), H], not its logits
  int64_t bits = 0;   // FusedQMoE: expert_weight_bits
  int64_t block = 0;  // FusedQMoE: block_size
  OrtOp* gemm = nullptr;  // ONNX Runtime's Gemm(A, B, transB=1) on this provider; null: our kernels only
  ~Kernel() {
    if (gemm) g_api->ReleaseOp(gemm);
  }
};

constexpr size_t kInputs = 6;  // x, router_logits, fc1, fc2, shared_fc1, shared_fc2

int moe_dtype_of(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return MOE_DTYPE_F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return MOE_DTYPE_F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return MOE_DTYPE_BF16;
    default: return -1;
  }
}

std::string dims_text(const TensorView& t) {
  std::string text = "[";
  for (size_t i = 0; i < t.dims.size(); ++i) text += (i ? ", " : "") + std::to_string(t.dims[i]);
  return text + "]";
}

// A [rows, cols] tensor of `type` over device memory that stays owned elsewhere.
OrtStatus* wrap(const OrtMemoryInfo* memory, void* data, int64_t rows, int64_t cols, ONNXTensorElementDataType type,
                OrtValue** out) {
  const int64_t dims[2] = {rows, cols};
  const size_t element = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 2;
  return g_api->CreateTensorWithDataAsOrtValue(memory, data, (size_t)(rows * cols) * element, dims, 2, type, out);
}

// Workspace pieces start on 256 bytes, as the kernels' own carving does.
size_t aligned(size_t n) { return (n + 255) / 256 * 256; }

// The op's output (shaped as its input) and ONNX Runtime's compute stream.
OrtStatus* output_and_stream(OrtKernelContext* ctx, const TensorView& x, void** out_data, void** stream) {
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, x.dims.data(), x.dims.size(), &out));
  ORT_TRY(g_api->GetTensorMutableData(out, out_data));
  return g_api->KernelContext_GetGPUComputeStream(ctx, stream);
}

// Router logits [T, E] as float32 at base (the kernels route in fp32) and, with a shared gate, its column [T] at
// base + logits_bytes (one token: right after the logits, inside their padding or the gate's piece), which
// shared->gate_logits then points to. router_rows: `router` is the router's weight rows [E (+1), H], and one launch
// of ours computes the logits from x (the router MatMul the ort-cuda swap folded in); else `router` holds the logits
// [T, E (+1)] in the model's dtype, converted to float32 (one launch; two for the gate column of several tokens).
int router_logits(const TensorView& router, bool router_rows, const TensorView& x, int dtype, int64_t E,
                  bool gate_column, char* base, size_t logits_bytes, moe_shared_expert* shared, void* stream) {
  const int64_t T = x.leading();
  float* logits = reinterpret_cast<float*>(base);
  float* gate = !gate_column ? nullptr : T == 1 ? logits + E : reinterpret_cast<float*>(base + logits_bytes);
  shared->gate_logits = gate;
  if (router_rows)
    return moe_compile_router_logits(x.data, router.data, dtype, T, x.dims.back(), E, gate_column ? 1 : 0, logits,
                                     gate, stream);
  const int64_t columns = E + gate_column;
  if (T == 1) return moe_compile_to_float(router.data, dtype, logits, 1, columns, columns, stream);
  int rc = moe_compile_to_float(router.data, dtype, logits, T, E, columns, stream);
  const size_t element = dtype == MOE_DTYPE_F32 ? 4 : 2;
  if (rc == MOE_OK && gate_column)
    rc = moe_compile_to_float(static_cast<char*>(router.data) + E * element, dtype, gate, T, 1, columns, stream);
  return rc;
}

// Whether input 1 fits: the logits [..., E (+1)] of the T tokens, or (router_rows) the router's rows [E (+1), H].
bool router_fits(const TensorView& router, bool router_rows, const TensorView& x, int64_t E, int64_t gate_column) {
  if (router_rows) return router.dims.size() == 2 && router.dims[0] == E + gate_column && router.dims[1] == x.dims.back();
  return !router.dims.empty() && router.dims.back() == E + gate_column && router.leading() == x.leading();
}

// out += g * down(silu(gate x) * up x) with ONNX Runtime's Gemm for the two matmuls; scratch holds
// [T, 2I_s + I_s + H] elements.
OrtStatus* shared_by_gemm(Kernel* kernel, OrtKernelContext* ctx, const OrtMemoryInfo* memory, const TensorView& x,
                          const OrtValue* sfc1, const OrtValue* sfc2, int64_t shared_i, const float* gate_logits,
                          int dtype, void* out, char* scratch, void* stream) {
  const int64_t T = x.leading(), H = x.dims.back();
  const size_t element = dtype == MOE_DTYPE_F32 ? 4 : 2;
  char* gate_up = scratch;
  char* act = gate_up + (size_t)(T * 2 * shared_i) * element;
  char* y = act + (size_t)(T * shared_i) * element;
  OrtValue* tensors[4] = {};  // x as [T, H], gate_up, act, y
  OrtStatus* status = wrap(memory, x.data, T, H, x.type, &tensors[0]);
  if (!status) status = wrap(memory, gate_up, T, 2 * shared_i, x.type, &tensors[1]);
  if (!status) status = wrap(memory, act, T, shared_i, x.type, &tensors[2]);
  if (!status) status = wrap(memory, y, T, H, x.type, &tensors[3]);
  if (!status) {
    const OrtValue* in1[2] = {tensors[0], sfc1};
    status = g_api->InvokeOp(ctx, kernel->gemm, in1, 2, &tensors[1], 1);
  }
  if (!status) {
    int rc = moe_compile_silu_mul(gate_up, dtype, act, T, shared_i, stream);
    if (rc != MOE_OK) status = fail(std::string("FusedMoE: ") + moe_compile_status_string(rc));
  }
  if (!status) {
    const OrtValue* in2[2] = {tensors[2], sfc2};
    status = g_api->InvokeOp(ctx, kernel->gemm, in2, 2, &tensors[3], 1);
  }
  if (!status) {
    int rc = moe_compile_add_gated(out, y, gate_logits, dtype, T, H, stream);
    if (rc != MOE_OK) status = fail(std::string("FusedMoE: ") + moe_compile_status_string(rc));
  }
  for (OrtValue* t : tensors)
    if (t) g_api->ReleaseValue(t);
  return status;
}

OrtStatus* compute(Kernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[kInputs] = {};
  TensorView x, logits, fc1, fc2, sfc1, sfc2;
  TensorView* views[kInputs] = {&x, &logits, &fc1, &fc2, &sfc1, &sfc2};
  ORT_TRY(get_inputs(ctx, "FusedMoE", kInputs, 4, values, views));
  const bool has_shared = values[4] && values[5];
  if (!has_shared && (values[4] || values[5])) return fail("FusedMoE: shared_fc1 and shared_fc2 come together");
  const int dtype = moe_dtype_of(x.type);
  if (dtype < 0 || logits.type != x.type || fc1.type != x.type || fc2.type != x.type ||
      (has_shared && (sfc1.type != x.type || sfc2.type != x.type)))
    return fail("FusedMoE: input, router_logits and the weights must share one type of float32, float16, bfloat16");
  if (x.dims.empty() || logits.dims.empty() || fc1.dims.size() != 3 || fc2.dims.size() != 3)
    return fail("FusedMoE: expected input [..., H], router_logits [..., E], fc1 [E, 2I, H], fc2 [E, H, I]");
  const int64_t T = x.leading(), H = x.dims.back(), E = fc1.dims[0], I = fc1.dims[1] / 2;
  const int64_t gate_column = kernel->shared_gate ? 1 : 0;
  if (fc1.dims[2] != H || fc1.dims[1] != 2 * I || fc2.dims[0] != E || fc2.dims[1] != H || fc2.dims[2] != I ||
      !router_fits(logits, kernel->router_rows, x, E, gate_column))
    return fail("FusedMoE: shapes disagree: input " + dims_text(x) + (kernel->router_rows ? ", router rows " : ", router_logits ") +
                dims_text(logits) + ", fc1 " + dims_text(fc1) + ", fc2 " + dims_text(fc2) +
                (gate_column ? " (shared_gate: E + 1 columns)" : ""));
  int64_t shared_i = 0;
  if (has_shared) {
    shared_i = sfc2.dims.size() == 2 ? sfc2.dims[1] : -1;
    if (sfc1.dims.size() != 2 || sfc1.dims[0] != 2 * shared_i || sfc1.dims[1] != H || sfc2.dims[0] != H)
      return fail("FusedMoE: shapes disagree: shared_fc1 " + dims_text(sfc1) + ", shared_fc2 " + dims_text(sfc2) +
                  " (expected [2I_s, " + std::to_string(H) + "], [" + std::to_string(H) + ", I_s])");
  } else if (gate_column) {
    return fail("FusedMoE: shared_gate = 1 without shared_fc1 and shared_fc2");
  }

  void *out_data = nullptr, *stream = nullptr;
  ORT_TRY(output_and_stream(ctx, x, &out_data, &stream));
  if (T == 0) return nullptr;
  const moe_shape shape = {T, H, I, E, dtype, MOE_GATE_UP_INTERLEAVED};
  const moe_routing routing = {MOE_ROUTING_SOFTMAX_TOPK, (int32_t)kernel->top_k, (int32_t)kernel->normalize, 1, 1, 1.0f};
  moe_shared_expert shared = {shared_i, MOE_GATE_UP_CONCATENATED, sfc1.data, sfc2.data, nullptr};
  // the shared expert inside our launches (batch-1 decode), else by ONNX Runtime's Gemm where it has one
  const bool shared_apart = has_shared && kernel->gemm && !moe_compile_streams_shared(&shape);
  const moe_shared_expert* in_kernels = has_shared && !shared_apart ? &shared : nullptr;
  const size_t kernel_bytes = moe_compile_workspace_size(&shape, &routing, in_kernels);
  if (kernel_bytes == 0) return fail(std::string("FusedMoE: ") + moe_compile_status_string(MOE_ERR_INVALID_ARGUMENT));
  // router logits (and the shared gate's column) as float32 first (the kernels route in fp32), the
  // kernels' own workspace, then the shared expert's GEMM scratch
  const size_t element = dtype == MOE_DTYPE_F32 ? 4 : 2;
  const size_t logits_bytes = aligned((size_t)(T * E) * sizeof(float)), gate_bytes = aligned((size_t)T * sizeof(float));
  const size_t scratch_bytes = shared_apart ? (size_t)(T * (3 * shared_i + H)) * element : 0;

  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* workspace = nullptr;
  OrtStatus* status =
      g_api->AllocatorAlloc(allocator, logits_bytes + gate_bytes + aligned(kernel_bytes) + scratch_bytes, &workspace);
  if (!status) {
    char* base = static_cast<char*>(workspace);
    int rc = router_logits(logits, kernel->router_rows, x, dtype, E, gate_column, base, logits_bytes, &shared, stream);
    if (rc == MOE_OK)
      rc = moe_compile_forward(&shape, &routing, in_kernels, x.data, reinterpret_cast<float*>(base), nullptr, fc1.data,
                               fc2.data, out_data, base + logits_bytes + gate_bytes, kernel_bytes, stream);
    if (rc != MOE_OK) status = fail(std::string("FusedMoE: ") + moe_compile_status_string(rc));
    if (!status && shared_apart)
      status = shared_by_gemm(kernel, ctx, memory, x, values[4], values[5], shared_i, shared.gate_logits, dtype,
                              out_data, base + logits_bytes + gate_bytes + aligned(kernel_bytes), stream);
    // Freed at once, as ORT's own kernels free scratch: the arena hands it out again only to
    // work later on this same stream.
    OrtStatus* freed = g_api->AllocatorFree(allocator, workspace);
    if (freed && !status) status = freed;
    else if (freed) g_api->ReleaseStatus(freed);
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

constexpr size_t kQuantizedInputs = 10;  // x, router_logits, fc1 codes/scales, fc2 codes/scales, shared: the same four

// FusedQMoE: x, router_logits, fc1 codes, fc1 scales, fc2 codes, fc2 scales[, shared fc1 codes, scales, fc2 codes,
// scales].
OrtStatus* compute_quantized(Kernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[kQuantizedInputs] = {};
  TensorView x, logits, fc1, fc1_scales, fc2, fc2_scales, sfc1, sfc1_scales, sfc2, sfc2_scales;
  TensorView* views[kQuantizedInputs] = {&x, &logits, &fc1, &fc1_scales, &fc2, &fc2_scales,
                                         &sfc1, &sfc1_scales, &sfc2, &sfc2_scales};
  ORT_TRY(get_inputs(ctx, "FusedQMoE", kQuantizedInputs, 6, values, views));
  int given = 0;  // of the shared expert's four
  for (size_t i = 6; i < kQuantizedInputs; ++i) given += values[i] != nullptr;
  if (given != 0 && given != 4) return fail("FusedQMoE: the shared expert's four inputs come together");
  const bool has_shared = given == 4;
  const int dtype = moe_dtype_of(x.type);
  const auto u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (dtype < 0 || logits.type != x.type || fc1_scales.type != x.type || fc2_scales.type != x.type || fc1.type != u8 ||
      fc2.type != u8 || (has_shared && (sfc1.type != u8 || sfc2.type != u8 || sfc1_scales.type != x.type ||
                                        sfc2_scales.type != x.type)))
    return fail("FusedQMoE: input, router_logits and the scales must share one float type, the codes be uint8");
  const int64_t bits = kernel->bits, block = kernel->block;
  if (x.dims.empty() || logits.dims.empty() || fc1.dims.size() != 3 || fc2.dims.size() != 3 ||
      fc1_scales.dims.size() != 3 || fc2_scales.dims.size() != 3)
    return fail("FusedQMoE: expected input [..., H], router_logits [..., E], codes and scales [E, N, ...]");
  const int64_t T = x.leading(), H = x.dims.back(), E = fc1.dims[0], I = fc1.dims[1] / 2;
  const int64_t gate_column = kernel->shared_gate ? 1 : 0;
  const bool fits = fc1.dims[1] == 2 * I && fc1.dims[2] * 8 == H * bits && fc2.dims[0] == E && fc2.dims[1] == H &&
                    fc2.dims[2] * 8 == I * bits && fc1_scales.dims[0] == E && fc1_scales.dims[1] == 2 * I &&
                    fc1_scales.dims[2] * block == H && fc2_scales.dims[0] == E && fc2_scales.dims[1] == H &&
                    fc2_scales.dims[2] * block == I && router_fits(logits, kernel->router_rows, x, E, gate_column);
  if (!fits)
    return fail("FusedQMoE: shapes disagree (bits " + std::to_string(bits) + ", block " + std::to_string(block) + "): input " +
                dims_text(x) + (kernel->router_rows ? ", router rows " : ", router_logits ") + dims_text(logits) +
                ", fc1 " + dims_text(fc1) + " / " +
                dims_text(fc1_scales) + ", fc2 " + dims_text(fc2) + " / " + dims_text(fc2_scales) +
                (gate_column ? " (shared_gate: E + 1 columns)" : ""));
  int64_t shared_i = 0;
  if (has_shared) {  // MatMulNBits' [N, K/block, block*bits/8] codes and [N, K/block] scales
    shared_i = sfc2_scales.dims.size() == 2 ? sfc2_scales.dims[1] * block : -1;
    const int64_t blob = block * bits / 8;
    const bool shared_fits = sfc1.dims.size() == 3 && sfc1.dims[0] == 2 * shared_i && sfc1.dims[1] * block == H &&
                             sfc1.dims[2] == blob && sfc1_scales.dims.size() == 2 && sfc1_scales.dims[0] == 2 * shared_i &&
                             sfc1_scales.dims[1] * block == H && sfc2.dims.size() == 3 && sfc2.dims[0] == H &&
                             sfc2.dims[1] * block == shared_i && sfc2.dims[2] == blob && sfc2_scales.dims[0] == H;
    if (!shared_fits)
      return fail("FusedQMoE: shapes disagree: shared_fc1 " + dims_text(sfc1) + " / " + dims_text(sfc1_scales) + ", shared_fc2 " +
                  dims_text(sfc2) + " / " + dims_text(sfc2_scales) + " (expected MatMulNBits' [N, K/" +
                  std::to_string(block) + ", " + std::to_string(blob) + "] codes, [N, K/block] scales)");
  } else if (gate_column) {
    return fail("FusedQMoE: shared_gate = 1 without the shared expert's inputs");
  }

  void *out_data = nullptr, *stream = nullptr;
  ORT_TRY(output_and_stream(ctx, x, &out_data, &stream));
  if (T == 0) return nullptr;
  const moe_shape shape = {T, H, I, E, dtype, MOE_GATE_UP_INTERLEAVED};
  const moe_routing routing = {MOE_ROUTING_SOFTMAX_TOPK, (int32_t)kernel->top_k, (int32_t)kernel->normalize, 1, 1, 1.0f};
  const moe_quantized_experts quant = {(int32_t)bits, (int32_t)block, fc1_scales.data, fc2_scales.data,
                                       has_shared ? sfc1_scales.data : nullptr, has_shared ? sfc2_scales.data : nullptr};
  moe_shared_expert shared = {shared_i, MOE_GATE_UP_CONCATENATED, sfc1.data, sfc2.data, nullptr};
  const moe_shared_expert* with = has_shared ? &shared : nullptr;
  const size_t kernel_bytes = moe_compile_workspace_size_quantized(&shape, &routing, &quant, with);
  if (kernel_bytes == 0) return fail(std::string("FusedQMoE: ") + moe_compile_status_string(MOE_ERR_INVALID_ARGUMENT));
  // router logits (and the shared gate's column) as float32 first, then the kernels' own workspace
  const size_t logits_bytes = aligned((size_t)(T * E) * sizeof(float)), gate_bytes = aligned((size_t)T * sizeof(float));

  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* workspace = nullptr;
  OrtStatus* status = g_api->AllocatorAlloc(allocator, logits_bytes + gate_bytes + kernel_bytes, &workspace);
  if (!status) {
    char* base = static_cast<char*>(workspace);
    int rc = router_logits(logits, kernel->router_rows, x, dtype, E, gate_column, base, logits_bytes, &shared, stream);
    if (rc == MOE_OK)
      rc = moe_compile_forward_quantized(&shape, &routing, &quant, with, x.data, reinterpret_cast<float*>(base), nullptr,
                                         fc1.data, fc2.data, out_data, base + logits_bytes + gate_bytes, kernel_bytes,
                                         stream);
    if (rc != MOE_OK) status = fail(std::string("FusedQMoE: ") + moe_compile_status_string(rc));
    OrtStatus* freed = g_api->AllocatorFree(allocator, workspace);  // as compute(): reused only later on this stream
    if (freed && !status) status = freed;
    else if (freed) g_api->ReleaseStatus(freed);
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

// ONNX Runtime's Gemm (opset 13, transB = 1) on the provider of this kernel; null if it has none. with_bias: beta = 1
// and a third input C (a bias row, broadcast). Every attribute is given: a kernel created this way gets no schema
// defaults (the CUDA Gemm refuses to construct without transA).
OrtOp* create_gemm(const OrtApi* api, const OrtKernelInfo* info, ONNXTensorElementDataType type, bool with_bias = false) {
  const int64_t zero = 0, one = 1;
  const float alpha = 1.0f, beta = with_bias ? 1.0f : 0.0f;
  OrtOpAttr* attrs[4] = {};
  OrtStatus* status = api->CreateOpAttr("transA", &zero, 1, ORT_OP_ATTR_INT, &attrs[0]);
  if (!status) status = api->CreateOpAttr("transB", &one, 1, ORT_OP_ATTR_INT, &attrs[1]);
  if (!status) status = api->CreateOpAttr("alpha", &alpha, 1, ORT_OP_ATTR_FLOAT, &attrs[2]);
  if (!status) status = api->CreateOpAttr("beta", &beta, 1, ORT_OP_ATTR_FLOAT, &attrs[3]);
  if (status) {
    api->ReleaseStatus(status);
    for (OrtOpAttr* a : attrs)
      if (a) api->ReleaseOpAttr(a);
    return nullptr;
  }
  const char* names[1] = {"T"};
  const ONNXTensorElementDataType types[1] = {type};
  OrtOp* op = nullptr;
  if (OrtStatus* status = api->CreateOp(info, "Gemm", "", 13, names, types, 1, attrs, 4, with_bias ? 3 : 2, 1, &op)) {
    static bool said = false;  // once a process: the ops still compute, on our kernels alone
    if (!said) fprintf(stderr, "moe_compile: ONNX Runtime's Gemm is not available to the custom ops (%s); beyond the "
                       "decode sizes they run on our kernels alone\n", api->GetErrorMessage(status));
    said = true;
    api->ReleaseStatus(status);
    op = nullptr;
  }
  for (OrtOpAttr* a : attrs) api->ReleaseOpAttr(a);
  return op;
}

// Rows of A up to which our kernel reads the codes (it reads them once per 16 rows); beyond, the weight is dequantized
// into the workspace for ONNX Runtime's Gemm (cuBLAS), as ONNX Runtime's own MatMulNBits does past one row.
constexpr int64_t kMatMulDecodeRows = 16;

struct MatMulKernel {
  int64_t k = 0, n = 0, bits = 0, block = 0;
  OrtOp* gemm = nullptr;  // Gemm(A, W, [bias], transB = 1); null: our kernel at every size
  ~MatMulKernel() {
    if (gemm) g_api->ReleaseOp(gemm);
  }
};

// y [M, N] = Gemm(A [M, K], W [N, K] dequantized into the workspace, bias).
OrtStatus* matmul_by_gemm(const MatMulKernel* kernel, OrtKernelContext* ctx, const OrtValue* const (&values)[4],
                          const TensorView& a, const TensorView& codes, const TensorView& scales, int dtype, void* y,
                          void* stream) {
  const int64_t M = a.leading(), K = kernel->k, N = kernel->n;
  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* weight = nullptr;
  OrtStatus* status = g_api->AllocatorAlloc(allocator, (size_t)(N * K) * 2, &weight);
  if (!status) {
    OrtValue* tensors[3] = {};  // A as [M, K], the weight, y as [M, N]
    const int rc = moe_compile_dequantize(codes.data, scales.data, N, K, (int32_t)kernel->bits, (int32_t)kernel->block,
                                          dtype, weight, stream);
    if (rc != MOE_OK) status = fail("MatMulNBits: dequantizing the weight failed");
    if (!status) status = wrap(memory, a.data, M, K, a.type, &tensors[0]);
    if (!status) status = wrap(memory, weight, N, K, a.type, &tensors[1]);
    if (!status) status = wrap(memory, y, M, N, a.type, &tensors[2]);
    if (!status) {
      const OrtValue* inputs[3] = {tensors[0], tensors[1], values[3]};
      status = g_api->InvokeOp(ctx, kernel->gemm, inputs, values[3] ? 3 : 2, &tensors[2], 1);
    }
    for (OrtValue* t : tensors)
      if (t) g_api->ReleaseValue(t);
    OrtStatus* freed = g_api->AllocatorFree(allocator, weight);  // as compute(): reused only later on this stream
    if (freed && !status) status = freed;
    else if (freed) g_api->ReleaseStatus(freed);
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

// MatMulNBits: A, codes, scales[, bias].
OrtStatus* compute_matmul(const MatMulKernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[4] = {};
  TensorView a, codes, scales, bias;
  TensorView* views[4] = {&a, &codes, &scales, &bias};
  ORT_TRY(get_inputs(ctx, "MatMulNBits", 4, 3, values, views));
  const int64_t K = kernel->k, N = kernel->n, bits = kernel->bits, block = kernel->block;
  const int dtype = moe_dtype_of(a.type);
  if ((dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) || scales.type != a.type || (values[3] && bias.type != a.type) ||
      codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    return fail("MatMulNBits: A, scales and bias must share float16 or bfloat16, the codes be uint8");
  auto elements = [](const TensorView& t) {
    int64_t n = 1;
    for (int64_t d : t.dims) n *= d;
    return n;
  };
  if (a.dims.empty() || a.dims.back() != K || elements(codes) * 8 != N * K * bits || elements(scales) * block != N * K ||
      (values[3] && elements(bias) != N))
    return fail("MatMulNBits: shapes disagree (K " + std::to_string(K) + ", N " + std::to_string(N) + ", bits " +
                std::to_string(bits) + ", block " + std::to_string(block) + "): A " + dims_text(a) + ", codes " +
                dims_text(codes) + ", scales " + dims_text(scales) + (values[3] ? ", bias " + dims_text(bias) : ""));
  std::vector<int64_t> out_dims = a.dims;
  out_dims.back() = N;
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims.data(), out_dims.size(), &out));
  void *y = nullptr, *stream = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(out, &y));
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  if (a.leading() == 0) return nullptr;
  if (a.leading() > kMatMulDecodeRows && kernel->gemm)
    return matmul_by_gemm(kernel, ctx, values, a, codes, scales, dtype, y, stream);
  const int rc = moe_compile_quantized_matmul(a.data, codes.data, scales.data, values[3] ? bias.data : nullptr, y,
                                              a.leading(), K, N, (int32_t)bits, (int32_t)block, dtype, stream);
  if (rc == MOE_ERR_CUDA) return fail("MatMulNBits: the kernel's launch failed");
  if (rc != MOE_OK) return fail("MatMulNBits: K a multiple of block_size (32, 64, 128), 4 or 8 bits, 16-byte aligned");
  return nullptr;
}

template <ONNXTensorElementDataType kType>
OrtStatus* ORT_API_CALL create_matmul_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                             void** out) {
  auto* kernel = new MatMulKernel();
  const char* names[4] = {"K", "N", "bits", "block_size"};
  int64_t* fields[4] = {&kernel->k, &kernel->n, &kernel->bits, &kernel->block};
  for (int i = 0; i < 4; ++i) {
    if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, names[i], fields[i])) {
      delete kernel;
      return status;
    }
  }
  size_t inputs = 0;
  if (OrtStatus* failed = api->KernelInfo_GetInputCount(info, &inputs)) api->ReleaseStatus(failed);
  kernel->gemm = create_gemm(api, info, kType, inputs > 3);
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_matmul_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute_matmul(static_cast<const MatMulKernel*>(kernel), ctx);
}

void ORT_API_CALL destroy_matmul_kernel(void* kernel) { delete static_cast<MatMulKernel*>(kernel); }

// GroupQueryAttention: inputs as com.microsoft's (the first nine); the attributes our kernels take.
constexpr size_t kAttentionInputs = 9;

struct AttentionKernel {
  int64_t num_heads = 0, kv_heads = 0, do_rotary = 0;
  float scale = 0.f;
  OrtOp* gqa = nullptr;  // com.microsoft:GroupQueryAttention on this provider: more than one new token a row
  // The decode launch's merge counters (moe_compile_attention_counters), one set a compute stream: runs on one
  // stream follow each other, runs on two may overlap. A set grown for a larger batch keeps the old one alive, which
  // a captured CUDA graph of the smaller batch still uses. All freed with the kernel.
  std::mutex counters_mutex;
  std::map<void*, std::pair<int32_t*, int64_t>> counters;  // stream -> (counters, how many)
  std::vector<int32_t*> outgrown;
  ~AttentionKernel() {
    if (gqa) g_api->ReleaseOp(gqa);
    for (auto& entry : counters) moe_compile_free_attention_counters(entry.second.first);
    for (int32_t* old : outgrown) moe_compile_free_attention_counters(old);
  }
  // `count` zeroed counters for a run on `stream`; NULL while the stream captures (the run then takes two launches).
  OrtStatus* counters_for(void* stream, int64_t count, int32_t** out) {
    std::lock_guard<std::mutex> lock(counters_mutex);
    auto& [have, size] = counters[stream];
    if (size < count) {
      int32_t* grown = nullptr;
      const int rc = moe_compile_attention_counters(count, stream, &grown);
      if (rc != MOE_OK) return fail(std::string("GroupQueryAttention: ") + moe_compile_status_string(rc));
      if (!grown) {
        *out = nullptr;
        return nullptr;
      }
      if (have) outgrown.push_back(have);
      have = grown, size = count;
    }
    *out = have;
    return nullptr;
  }
};

// Prefill: ONNX Runtime's kernel, invoked. Invoked kernels run on the op's compute stream (InvokeOp hands them
// the context's stream: onnxruntime/core/session/standalone_op_invoker.cc, since 1.14), as the Gemms above do.
OrtStatus* attention_by_onnxruntime(const AttentionKernel* kernel, OrtKernelContext* ctx,
                                    const OrtValue* const (&values)[kAttentionInputs], OrtValue* const (&outputs)[3]) {
  if (!kernel->gqa) return fail("GroupQueryAttention: ONNX Runtime's kernel for prefill could not be created");
  return g_api->InvokeOp(ctx, kernel->gqa, values, kAttentionInputs, outputs, 3);
}

OrtStatus* compute_attention(AttentionKernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[kAttentionInputs] = {};
  TensorView q, k, v, past_k, past_v, seqlens, total, cos, sin;
  TensorView* views[kAttentionInputs] = {&q, &k, &v, &past_k, &past_v, &seqlens, &total, &cos, &sin};
  ORT_TRY(get_inputs(ctx, "GroupQueryAttention", kAttentionInputs, 0, values, views));  // which are needed: below
  const bool packed = !values[1];
  if (!values[0] || !values[3] || !values[4] || !values[5] || (packed && values[2]) || (!packed && !values[2]) ||
      (kernel->do_rotary && (!values[7] || !values[8])))
    return fail("GroupQueryAttention: query, past_key/value, seqlens_k (and cos/sin with rotary) are required; key "
                "and value come together");
  const int dtype = moe_dtype_of(q.type);
  if ((dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) || past_k.type != q.type || past_v.type != q.type ||
      (!packed && (k.type != q.type || v.type != q.type)) || seqlens.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
    return fail("GroupQueryAttention: query, key, value and the cache share float16 or bfloat16; seqlens_k is int32");
  const int64_t N = kernel->num_heads, KV = kernel->kv_heads;
  if (q.dims.size() != 3 || past_k.dims.size() != 4 || past_k.dims != past_v.dims || past_k.dims[1] != KV)
    return fail("GroupQueryAttention: expected query [B, S, hidden] and past_key/value [B, " + std::to_string(KV) +
                ", max_seq, head_size]: query " + dims_text(q) + ", past_key " + dims_text(past_k));
  const int64_t B = q.dims[0], S = q.dims[1], D = past_k.dims[3], max_seq = past_k.dims[2];
  if (q.dims[2] != (packed ? (N + 2 * KV) * D : N * D) || past_k.dims[0] != B || seqlens.dims.empty() ||
      seqlens.dims[0] != B || (!packed && (k.dims != v.dims || k.dims.size() != 3 || k.dims[2] != KV * D)))
    return fail("GroupQueryAttention: shapes disagree: query " + dims_text(q) + ", past_key " + dims_text(past_k) +
                ", seqlens_k " + dims_text(seqlens) + (packed ? "" : ", key " + dims_text(k)));
  const int64_t out_dims[3] = {B, S, N * D};
  OrtValue* outputs[3] = {};
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims, 3, &outputs[0]));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, past_k.dims.data(), 4, &outputs[1]));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 2, past_v.dims.data(), 4, &outputs[2]));
  if (B == 0 || S == 0) return nullptr;
  if (S != 1) return attention_by_onnxruntime(kernel, ctx, values, outputs);
  void *out = nullptr, *present_k = nullptr, *present_v = nullptr, *stream = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(outputs[0], &out));
  ORT_TRY(g_api->GetTensorMutableData(outputs[1], &present_k));
  ORT_TRY(g_api->GetTensorMutableData(outputs[2], &present_v));
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const int64_t rotary_half = kernel->do_rotary ? cos.dims.back() : 0;
  const float scale = kernel->scale != 0.f ? kernel->scale : 1.f / sqrtf((float)D);
  const size_t element = 2;
  const char* row = static_cast<const char*>(q.data);
  const void* key = packed ? row + N * D * element : k.data;
  const void* value = packed ? row + (N + KV) * D * element : v.data;
  const int64_t kv_stride = packed ? q.dims[2] : KV * D;
  const size_t bytes = moe_compile_decode_attention_workspace_size(B, N, KV, D, max_seq);
  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* workspace = nullptr;
  int32_t* counters = nullptr;
  OrtStatus* status = bytes ? g_api->AllocatorAlloc(allocator, bytes, &workspace) : nullptr;
  if (!status && bytes) status = kernel->counters_for(stream, B * KV, &counters);
  if (!status) {
    const int rc = moe_compile_decode_attention(
        q.data, key, value, q.dims[2], kv_stride, past_k.data, past_v.data, present_k, present_v,
        static_cast<const int32_t*>(seqlens.data), cos.data, sin.data, rotary_half, B, N, KV, D, max_seq, scale, dtype,
        out, workspace, bytes, counters, stream);
    if (rc != MOE_OK) status = fail(std::string("GroupQueryAttention: ") + moe_compile_status_string(rc));
    if (workspace) {
      OrtStatus* freed = g_api->AllocatorFree(allocator, workspace);  // reused only later on this stream
      if (freed && !status) status = freed;
      else if (freed) g_api->ReleaseStatus(freed);
    }
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

// ONNX Runtime's GroupQueryAttention for this type (the cache of the same type), with the node's attributes.
OrtOp* create_gqa(const OrtApi* api, const OrtKernelInfo* info, ONNXTensorElementDataType type,
                  const AttentionKernel& kernel) {
  const int64_t ints[4] = {kernel.num_heads, kernel.kv_heads, kernel.do_rotary, 0};
  const char* int_names[4] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"};
  OrtOpAttr* attrs[5] = {};
  OrtStatus* status = nullptr;
  for (int i = 0; i < 4 && !status; ++i) status = api->CreateOpAttr(int_names[i], &ints[i], 1, ORT_OP_ATTR_INT, &attrs[i]);
  if (!status) status = api->CreateOpAttr("scale", &kernel.scale, 1, ORT_OP_ATTR_FLOAT, &attrs[4]);
  // onnxruntime 1.31's CUDA kernel declares all four (CreateOp takes them: H200, 2026-12-02), older ones T and M
  // only (a constraint the kernel does not declare is not looked at; if CreateOp fails, prefill says so in one line)
  const char* names[4] = {"T", "T_CACHE", "T_KV_SCALE", "M"};
  const ONNXTensorElementDataType types[4] = {type, type, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                              ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
  OrtOp* op = nullptr;
  if (!status) status = api->CreateOp(info, "GroupQueryAttention", "com.microsoft", 1, names, types, 4, attrs, 5,
                                      (int)kAttentionInputs, 3, &op);
  if (status) {
    api->ReleaseStatus(status);
    op = nullptr;
  }
  for (OrtOpAttr* attr : attrs)
    if (attr) api->ReleaseOpAttr(attr);
  return op;
}

template <ONNXTensorElementDataType kType>
OrtStatus* ORT_API_CALL create_attention_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                                void** out) {
  auto* kernel = new AttentionKernel();
  OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "num_heads", &kernel->num_heads);
  if (!status) status = api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &kernel->kv_heads);
  if (!status) status = api->KernelInfoGetAttribute_int64(info, "do_rotary", &kernel->do_rotary);
  if (!status) status = api->KernelInfoGetAttribute_float(info, "scale", &kernel->scale);
  if (!status && (kernel->num_heads <= 0 || kernel->kv_heads <= 0 || kernel->num_heads % kernel->kv_heads))
    status = api->CreateStatus(ORT_INVALID_ARGUMENT, "moe_compile:GroupQueryAttention: num_heads a multiple of kv_num_heads");
  if (status) {
    delete kernel;
    return status;
  }
  kernel->gqa = create_gqa(api, info, kType, *kernel);
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_attention_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute_attention(static_cast<AttentionKernel*>(kernel), ctx);
}

void ORT_API_CALL destroy_attention_kernel(void* kernel) { delete static_cast<AttentionKernel*>(kernel); }

struct NormKernel {
  float epsilon = 0.f;
  bool has_sum = false;  // the node has output 3, input_skip_bias_sum
};

// SkipSimplifiedLayerNormalization: input, skip, gamma[, bias].
OrtStatus* compute_norm(const NormKernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[4] = {};
  TensorView x, skip, gamma, bias;
  TensorView* views[4] = {&x, &skip, &gamma, &bias};
  ORT_TRY(get_inputs(ctx, "SkipSimplifiedLayerNormalization", 4, 3, values, views));
  const int dtype = moe_dtype_of(x.type);
  if ((dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) || skip.type != x.type || gamma.type != x.type ||
      (values[3] && bias.type != x.type))
    return fail("SkipSimplifiedLayerNormalization: input, skip, gamma and bias must share float16 or bfloat16");
  const int64_t H = x.dims.empty() ? 0 : x.dims.back();
  const auto row_of_h = [H](const TensorView& t) { return t.dims.size() == 1 && t.dims[0] == H; };
  if (x.dims.empty() || skip.dims != x.dims || !row_of_h(gamma) || (values[3] && !row_of_h(bias)))
    return fail("SkipSimplifiedLayerNormalization: expected input [..., H], skip of its shape, gamma and bias [H]: "
                "input " + dims_text(x) + ", skip " + dims_text(skip) + ", gamma " + dims_text(gamma) +
                (values[3] ? ", bias " + dims_text(bias) : ""));
  void *out = nullptr, *sum = nullptr, *stream = nullptr;
  ORT_TRY(output_and_stream(ctx, x, &out, &stream));
  if (kernel->has_sum) {
    OrtValue* sum_value = nullptr;
    ORT_TRY(g_api->KernelContext_GetOutput(ctx, 3, x.dims.data(), x.dims.size(), &sum_value));
    ORT_TRY(g_api->GetTensorMutableData(sum_value, &sum));
  }
  const int rc = moe_compile_skip_rms_norm(x.data, skip.data, values[3] ? bias.data : nullptr, gamma.data, dtype,
                                           x.leading(), H, kernel->epsilon, out, sum, stream);
  if (rc == MOE_ERR_CUDA) return fail("SkipSimplifiedLayerNormalization: the kernel's launch failed");
  if (rc != MOE_OK) return fail("SkipSimplifiedLayerNormalization: H a multiple of 8 up to 32768, 16-byte aligned: " +
                                dims_text(x));
  return nullptr;
}

// Whether the node has output `index` (ONNX Runtime lists an absent optional output as an empty name).
bool has_output(const OrtApi* api, const OrtKernelInfo* info, size_t index) {
  size_t count = 0, size = 0;
  if (OrtStatus* failed = api->KernelInfo_GetOutputCount(info, &count)) api->ReleaseStatus(failed);
  if (index >= count) return false;
  if (OrtStatus* failed = api->KernelInfo_GetOutputName(info, index, nullptr, &size)) {
    api->ReleaseStatus(failed);
    return false;
  }
  return size > 1;  // the name's bytes with its terminating zero
}

OrtStatus* ORT_API_CALL create_norm_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                           void** out) {
  if (has_output(api, info, 1) || has_output(api, info, 2))
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "moe_compile:SkipSimplifiedLayerNormalization: outputs mean and "
                                                   "inv_std_var are not computed (output and input_skip_bias_sum are)");
  auto* kernel = new NormKernel();
  if (OrtStatus* status = api->KernelInfoGetAttribute_float(info, "epsilon", &kernel->epsilon)) {
    delete kernel;
    return status;
  }
  kernel->has_sum = has_output(api, info, 3);
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_norm_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute_norm(static_cast<const NormKernel*>(kernel), ctx);
}

void ORT_API_CALL destroy_norm_kernel(void* kernel) { delete static_cast<NormKernel*>(kernel); }

struct TopKKernel {
  int64_t k = 0;
  bool has_argmax = false;  // the node has output 2
};

// TopK: X [..., n] float32 -> values, indices [..., k] (and argmax [...]).
OrtStatus* compute_top_k(const TopKKernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[1] = {};
  TensorView x;
  TensorView* views[1] = {&x};
  ORT_TRY(get_inputs(ctx, "TopK", 1, 1, values, views));
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.dims.empty() || x.dims.back() < kernel->k)
    return fail("TopK: expected float32 X [..., n] with n >= k = " + std::to_string(kernel->k) + ": " + dims_text(x));
  const int64_t rows = x.leading(), n = x.dims.back();
  std::vector<int64_t> out_dims = x.dims;
  out_dims.back() = kernel->k;
  OrtValue *top_values = nullptr, *top_indices = nullptr, *argmax = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims.data(), out_dims.size(), &top_values));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, out_dims.data(), out_dims.size(), &top_indices));
  if (kernel->has_argmax) ORT_TRY(g_api->KernelContext_GetOutput(ctx, 2, x.dims.data(), x.dims.size() - 1, &argmax));
  if (rows == 0) return nullptr;
  void *values_data = nullptr, *indices_data = nullptr, *argmax_data = nullptr, *stream = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(top_values, &values_data));
  ORT_TRY(g_api->GetTensorMutableData(top_indices, &indices_data));
  if (argmax) ORT_TRY(g_api->GetTensorMutableData(argmax, &argmax_data));
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const size_t bytes = moe_compile_top_k_workspace_size(rows, n);
  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* workspace = nullptr;
  OrtStatus* status = g_api->AllocatorAlloc(allocator, bytes, &workspace);
  if (!status) {
    const int rc = moe_compile_top_k(static_cast<const float*>(x.data), rows, n, kernel->k,
                                     static_cast<float*>(values_data), static_cast<int64_t*>(indices_data),
                                     static_cast<int64_t*>(argmax_data), workspace, bytes, stream);
    if (rc != MOE_OK) status = fail(std::string("TopK: ") + moe_compile_status_string(rc) + ": X " + dims_text(x));
    OrtStatus* freed = g_api->AllocatorFree(allocator, workspace);  // reused only later on this stream
    if (freed && !status) status = freed;
    else if (freed) g_api->ReleaseStatus(freed);
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

OrtStatus* ORT_API_CALL create_top_k_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                            void** out) {
  auto* kernel = new TopKKernel();
  if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "k", &kernel->k)) {
    delete kernel;
    return status;
  }
  if (kernel->k < 1 || kernel->k > 64) {
    delete kernel;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "moe_compile:TopK: k must be 1 to 64");
  }
  kernel->has_argmax = has_output(api, info, 2);
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_top_k_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute_top_k(static_cast<const TopKKernel*>(kernel), ctx);
}

void ORT_API_CALL destroy_top_k_kernel(void* kernel) { delete static_cast<TopKKernel*>(kernel); }

// Reads the attributes every op has (k, optional normalize_routing_weights) and `optional` ones that
// default to 0; a missing required one fails the session's creation.
OrtStatus* read_attributes(const OrtApi* api, const OrtKernelInfo* info, Kernel* kernel, bool quantized) {
  ORT_TRY(api->KernelInfoGetAttribute_int64(info, "k", &kernel->top_k));
  auto optional = [&](const char* name, int64_t* value) {
    if (OrtStatus* missing = api->KernelInfoGetAttribute_int64(info, name, value)) {
      api->ReleaseStatus(missing);
      *value = 0;  // com.microsoft:MoE's default normalize_routing_weights; no shared gate column
    }
  };
  optional("normalize_routing_weights", &kernel->normalize);
  optional("shared_gate", &kernel->shared_gate);
  optional("router_rows", &kernel->router_rows);
  if (quantized) {
    ORT_TRY(api->KernelInfoGetAttribute_int64(info, "expert_weight_bits", &kernel->bits));
    ORT_TRY(api->KernelInfoGetAttribute_int64(info, "block_size", &kernel->block));
  }
  return nullptr;
}

template <ONNXTensorElementDataType kType, bool kQuantized>
OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* kernel = new Kernel();
  if (OrtStatus* status = read_attributes(api, info, kernel, kQuantized)) {
    delete kernel;
    return status;
  }
  size_t inputs = 0;
  if (OrtStatus* failed = api->KernelInfo_GetInputCount(info, &inputs)) api->ReleaseStatus(failed);
  if (!kQuantized && inputs >= kInputs) kernel->gemm = create_gemm(api, info, kType);  // only nodes with a shared expert
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute(static_cast<Kernel*>(kernel), ctx);
}

OrtStatus* ORT_API_CALL compute_quantized_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute_quantized(static_cast<Kernel*>(kernel), ctx);
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// One op object per element type: ORT picks the kernel by the type of the inputs.
template <ONNXTensorElementDataType kType>
OrtCustomOp make_op() {
  OrtCustomOp op = {};
  op.version = kApiVersion;
  op.GetName = [](const OrtCustomOp*) { return "FusedMoE"; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CUDAExecutionProvider"; };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return kType; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kInputs; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return kType; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.CreateKernelV2 = create_kernel<kType, false>;
  op.KernelComputeV2 = compute_kernel;
  op.KernelDestroy = destroy_kernel;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
  return op;
}

// FusedQMoE: the codes (inputs 2, 4, 6 and 8) are uint8, everything else kType; the shared expert's four optional.
template <ONNXTensorElementDataType kType>
OrtCustomOp make_quantized_op() {
  OrtCustomOp op = make_op<kType>();
  op.GetName = [](const OrtCustomOp*) { return "FusedQMoE"; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) {
    return i >= 2 && i % 2 == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : kType;
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kQuantizedInputs; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.CreateKernelV2 = create_kernel<kType, true>;
  op.KernelComputeV2 = compute_quantized_kernel;
  return op;
}

// MatMulNBits: the codes (input 1) are uint8, everything else kType (16-bit only); the bias optional.
template <ONNXTensorElementDataType kType>
OrtCustomOp make_matmul_op() {
  OrtCustomOp op = make_op<kType>();
  op.GetName = [](const OrtCustomOp*) { return "MatMulNBits"; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) { return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : kType; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.CreateKernelV2 = create_matmul_kernel<kType>;
  op.KernelComputeV2 = compute_matmul_kernel;
  op.KernelDestroy = destroy_matmul_kernel;
  return op;
}

// GroupQueryAttention: seqlens_k (input 5) int32, total_sequence_length (6) an int32 on the host (as ONNX Runtime's
// kernel takes it), everything else kType (16-bit only); key and value optional (packed query), cos/sin optional.
template <ONNXTensorElementDataType kType>
OrtCustomOp make_attention_op() {
  OrtCustomOp op = make_op<kType>();
  op.GetName = [](const OrtCustomOp*) { return "GroupQueryAttention"; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) {
    return i == 5 || i == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : kType;
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kAttentionInputs; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i == 0 || (i >= 3 && i <= 6) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t i) { return i == 6 ? OrtMemTypeCPUInput : OrtMemTypeDefault; };
  op.CreateKernelV2 = create_attention_kernel<kType>;
  op.KernelComputeV2 = compute_attention_kernel;
  op.KernelDestroy = destroy_attention_kernel;
  return op;
}

// SkipSimplifiedLayerNormalization: every input and outputs 0 and 3 kType (16-bit only), mean and inv_std_var float as
// ONNX Runtime's schema has them; bias optional, outputs past the first optional.
template <ONNXTensorElementDataType kType>
OrtCustomOp make_norm_op() {
  OrtCustomOp op = make_op<kType>();
  op.GetName = [](const OrtCustomOp*) { return "SkipSimplifiedLayerNormalization"; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
  op.GetOutputType = [](const OrtCustomOp*, size_t i) {
    return i == 1 || i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : kType;
  };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.CreateKernelV2 = create_norm_kernel;
  op.KernelComputeV2 = compute_norm_kernel;
  op.KernelDestroy = destroy_norm_kernel;
  return op;
}

// TopK: float32 X; values float32, indices and argmax int64; argmax optional.
OrtCustomOp make_top_k_op() {
  OrtCustomOp op = make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>();
  op.GetName = [](const OrtCustomOp*) { return "TopK"; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetOutputType = [](const OrtCustomOp*, size_t i) {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.CreateKernelV2 = create_top_k_kernel;
  op.KernelComputeV2 = compute_top_k_kernel;
  op.KernelDestroy = destroy_top_k_kernel;
  return op;
}

OrtCustomOp g_ops[] = {make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(), make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(),
                       make_quantized_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(),
                       make_quantized_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_quantized_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(),
                       make_matmul_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(),
                       make_matmul_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_attention_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(),
                       make_attention_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_norm_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(),
                       make_norm_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_top_k_op()};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                         const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiVersion);
  if (!g_api) {
    fprintf(stderr, "moe_compile FusedMoE: this onnxruntime does not provide C API version %u\n", kApiVersion);
    return nullptr;  // no API to report the error with
  }
  OrtCustomOpDomain* domain = nullptr;
  ORT_TRY(g_api->CreateCustomOpDomain("moe_compile", &domain));
  for (const OrtCustomOp& op : g_ops) ORT_TRY(g_api->CustomOpDomain_Add(domain, &op));
  // The domain must outlive every session that uses it: it is never released (one per process load).
  return g_api->AddCustomOpDomain(options, domain);
}
