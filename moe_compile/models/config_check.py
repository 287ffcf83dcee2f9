"""A checkpoint's config.json, validated before anything is loaded: the types and sizes every family
reads, and what the model will cost (parameters, bytes in memory and on disk) from those sizes alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic
from pydantic import BaseModel, ConfigDict, PositiveInt

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..quantize import Quantization

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Measured (docs/BENCHMARKS.md, Qwen1.5-MoE-A2.7B fp16): peak host memory 50.9 GB for 28.6 GB of weights.
PEAK_MEMORY_PER_WEIGHT_BYTE = 2


class CheckpointConfig(BaseModel):
    """The fields moe-compile reads, by the names HF configs use (one of each alias group is enough)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model_type: str
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    moe_intermediate_size: PositiveInt | None = None
    shared_expert_intermediate_size: PositiveInt | None = None
    shared_intermediate_size: PositiveInt | None = None
    n_shared_experts: PositiveInt | None = None
    num_experts: PositiveInt | None = None
    num_local_experts: PositiveInt | None = None
    n_routed_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None
    max_position_embeddings: PositiveInt | None = None
    tie_word_embeddings: bool | None = False

    def parameters(self) -> int:
        """An upper estimate: every layer as a MoE layer, attention as plain multi-head projections."""
        h, heads = self.hidden_size, self.num_attention_heads
        head_dim = self.head_dim or h // heads or 1
        kv_heads = self.num_key_value_heads or heads
        attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
        experts = self.num_experts or self.num_local_experts or self.n_routed_experts or 1
        width = self.moe_intermediate_size or self.intermediate_size or 4 * h
        shared = (self.shared_expert_intermediate_size or self.shared_intermediate_size
                  or (self.n_shared_experts or 0) * width)
        mlp = 3 * h * (experts * width + shared) + h * experts  # gate/up/down of each expert, and the router
        return self.num_hidden_layers * (attention + mlp) + self.vocab_size * h * (1 if self.tie_word_embeddings else 2)


@dataclasses.dataclass
class Estimate:
    parameters: int
    weight_bytes: int  # in the build's dtype: about what model.onnx (+ its data) holds
    peak_memory_bytes: int


def validate_config(config: object, path: Path) -> CheckpointConfig:
    """config.json's content (parsed JSON) -> its checked sizes, or one line naming the first bad field."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object: not a HF config")
    try:
        return CheckpointConfig.model_validate(config)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(map(str, error["loc"]))
        shown = repr(error["input"]) if field in config else "missing"
        raise CheckpointError(f"{path}: {field}: {error['msg']} (got {shown:.60})") from None


def estimate(config: CheckpointConfig, dtype: str) -> Estimate:
    parameters = config.parameters()
    weight_bytes = parameters * BYTES[dtype]
    return Estimate(parameters, weight_bytes, weight_bytes * PEAK_MEMORY_PER_WEIGHT_BYTE)


def file_bytes(config: CheckpointConfig, dtype: str, quantization: Quantization | None = None) -> int:
    """About what model.onnx (+ its data) will hold. Quantized (the rewrite happens before the file is
    written): the layers' weights at bits/8 bytes plus one scale in the build's dtype per block; the
    embedding table, and the lm_head unless quantized too, in the build's dtype."""
    if quantization is None:
        return config.parameters() * BYTES[dtype]
    table = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else table
    quantized = config.parameters() - table - (0 if quantization.lm_head else head)
    packed = quantization.bits / 8 + BYTES[dtype] / quantization.block_size
    return int(quantized * packed + (config.parameters() - quantized) * BYTES[dtype])


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(config: CheckpointConfig, dtype: str, force: bool) -> Estimate:
    """Refuse a model whose estimated build memory exceeds what is available, unless `force`."""
    needs = estimate(config, dtype)
    free = available_memory()
    if free is not None and needs.peak_memory_bytes > free and not force:
        raise CheckpointError(
            f"{config.model_type} of ~{needs.parameters / 1e9:.3g} B parameters needs about "
            f"{needs.peak_memory_bytes / 2**30:.3g} GiB of memory to build in {dtype}, {free / 2**30:.3g} GiB are "
            "available; check config.json's sizes, or pass --force to try anyway")
    return needs
