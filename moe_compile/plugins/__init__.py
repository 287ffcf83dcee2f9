"""The fused MoE op: CUDA kernels behind a C ABI (csrc/), their build, a torch binding
(``torch_ops``: ``torch.ops.moe_compile.fused_moe_cuda``), the graph op the `fused` lowering emits
(``fused_op``: ``torch.ops.moe_compile.fused_moe``) and the TensorRT plugin (``trt_plugin``).
"""
