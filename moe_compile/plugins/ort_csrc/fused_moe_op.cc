// ONNX Runtime custom-op library: `moe_compile:FusedMoE` on the CUDA execution provider, the fused
// MoE kernels (../csrc, C ABI fused_moe.h) called on ORT's compute stream. Written against
// onnxruntime's C API only (onnxruntime_c_api.h from the release archive's include/), so one
// library loads into every onnxruntime-gpu from 1.18 on.
//
//   FusedMoE(input [..., H], router_logits [..., E], fc1 [E, 2I, H] (g0, u0, g1, u1, ...), fc2 [E, H, I])
//     k, normalize_routing_weights  ->  output [..., H]
//
// The semantics are com.microsoft:MoE's with activation_type=swiglu, swiglu_fusion=1, alpha 1,
// beta 0, no biases: the ort form's graph for CUDA (runtime/ort_backend.py) swaps such MoE nodes
// for this one. No allocation outside ORT: the workspace comes from the kernel context's
// allocator, so CUDA-graph capture sees the same addresses ORT's own kernels get.
#include <stdio.h>

#include <string>
#include <vector>

#include "fused_moe.h"
#include "onnxruntime_c_api.h"

namespace {

constexpr uint32_t kApiVersion = 18;  // KernelContext_GetAllocator is the newest call used
const OrtApi* g_api = nullptr;

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, ("FusedMoE: " + msg).c_str()); }

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

struct Kernel {
  int64_t top_k = 0;
  int64_t normalize = 0;
};

int moe_dtype_of(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return MOE_DTYPE_F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return MOE_DTYPE_F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return MOE_DTYPE_BF16;
    default: return -1;
  }
}

OrtStatus* compute(Kernel* kernel, OrtKernelContext* ctx) {
  const OrtValue* values[4];
  TensorView x, logits, fc1, fc2;
  TensorView* views[4] = {&x, &logits, &fc1, &fc2};
  for (size_t i = 0; i < 4; ++i) {
    ORT_TRY(g_api->KernelContext_GetInput(ctx, i, &values[i]));
    if (!values[i]) return fail("input " + std::to_string(i) + " is missing");
    ORT_TRY(view(values[i], views[i]));
  }
  const int dtype = moe_dtype_of(x.type);
  if (dtype < 0 || logits.type != x.type || fc1.type != x.type || fc2.type != x.type)
    return fail("input, router_logits, fc1 and fc2 must share one type of float32, float16, bfloat16");
  if (x.dims.empty() || logits.dims.empty() || fc1.dims.size() != 3 || fc2.dims.size() != 3)
    return fail("expected input [..., H], router_logits [..., E], fc1 [E, 2I, H], fc2 [E, H, I]");
  const int64_t T = x.leading(), H = x.dims.back(), E = fc1.dims[0], I = fc1.dims[1] / 2;
  if (fc1.dims[2] != H || fc1.dims[1] != 2 * I || fc2.dims[0] != E || fc2.dims[1] != H || fc2.dims[2] != I ||
      logits.dims.back() != E || logits.leading() != T)
    return fail("shapes disagree: input [" + std::to_string(T) + ", " + std::to_string(H) + "], fc1 [" +
                std::to_string(fc1.dims[0]) + ", " + std::to_string(fc1.dims[1]) + ", " + std::to_string(fc1.dims[2]) +
                "], router_logits last dim " + std::to_string(logits.dims.back()));

  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, x.dims.data(), x.dims.size(), &out));
  void* out_data = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(out, &out_data));
  if (T == 0) return nullptr;

  void* stream = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const moe_shape shape = {T, H, I, E, dtype, MOE_GATE_UP_INTERLEAVED};
  const moe_routing routing = {MOE_ROUTING_SOFTMAX_TOPK, (int32_t)kernel->top_k, (int32_t)kernel->normalize, 1, 1, 1.0f};
  const size_t kernel_bytes = moe_compile_workspace_size(&shape, &routing);
  if (kernel_bytes == 0) return fail(moe_compile_status_string(MOE_ERR_INVALID_ARGUMENT));
  // router logits as float32 first (the kernels route in fp32), then the kernels' own workspace
  const size_t logits_bytes = ((size_t)(T * E) * sizeof(float) + 255) / 256 * 256;

  const OrtMemoryInfo* memory = nullptr;
  ORT_TRY(g_api->GetTensorMemoryInfo(values[0], &memory));
  OrtAllocator* allocator = nullptr;
  ORT_TRY(g_api->KernelContext_GetAllocator(ctx, memory, &allocator));
  void* workspace = nullptr;
  OrtStatus* status = g_api->AllocatorAlloc(allocator, logits_bytes + kernel_bytes, &workspace);
  if (!status) {
    float* logits_f32 = static_cast<float*>(workspace);
    int rc = moe_compile_to_float(logits.data, dtype, logits_f32, T * E, stream);
    if (rc == MOE_OK)
      rc = moe_compile_forward(&shape, &routing, x.data, logits_f32, nullptr, fc1.data, fc2.data, out_data,
                               static_cast<char*>(workspace) + logits_bytes, kernel_bytes, stream);
    if (rc != MOE_OK) status = fail(moe_compile_status_string(rc));
    // Freed at once, as ORT's own kernels free scratch: the arena hands it out again only to
    // work later on this same stream.
    OrtStatus* freed = g_api->AllocatorFree(allocator, workspace);
    if (freed && !status) status = freed;
    else if (freed) g_api->ReleaseStatus(freed);
  }
  g_api->ReleaseAllocator(allocator);
  return status;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* kernel = new Kernel();
  OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "k", &kernel->top_k);
  if (status) {
    delete kernel;
    return status;
  }
  if (OrtStatus* missing = api->KernelInfoGetAttribute_int64(info, "normalize_routing_weights", &kernel->normalize)) {
    api->ReleaseStatus(missing);  // optional: com.microsoft:MoE's default
    kernel->normalize = 0;
  }
  *out = kernel;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  return compute(static_cast<Kernel*>(kernel), ctx);
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
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return kType; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.KernelDestroy = destroy_kernel;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
  return op;
}

OrtCustomOp g_ops[] = {make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(), make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(),
                       make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>()};

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
