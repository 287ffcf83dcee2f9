"""The fused MoE op: CUDA kernels behind a C ABI (csrc/), their build, and a torch binding.

Import ``moe_compile.plugins.torch_ops`` to register ``torch.ops.moe_compile.fused_moe_cuda``.
"""
