"""Weight-only int8/int4 quantization (`build --quantize int8|int4 [--block-size N] [--quantize-lm-head]
[--scales absmax|mse]`).

One quantizer (round-to-nearest, symmetric, per block of K, fp16 scales: packing.py; each block's scale its
largest magnitude's, or with `--scales mse` the one that rebuilds the block best), applied twice to the same
weights so that both sides agree bit for bit:
- torch_weights.py, before capture: each quantized weight of the loaded model is replaced by its
  dequantized value, one tensor at a time. The captured program (the build's check, program.pt2) is
  then the dequantized reference of the build.
- onnx_rewrite.py, after export: the same weights (re-quantizing a dequantized weight gives the same
  codes) become `com.microsoft:QMoE` and `com.microsoft:MatMulNBits` (ort form) or int4/int8 initializers
  behind `DequantizeLinear` (opset 21, portable form).

Which weights: `weight_class` names a weight by the module that owns it. Routed experts, shared/dense MLP
projections and attention projections are quantized, the LM head on request; routers, the shared
expert's gate, embeddings and norms keep the build's dtype (tiny tensors that decide routing, or
tensors read a row at a time).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import RequestError
from .packing import BITS, BLOCK_SIZES, DEFAULT_BLOCK_SIZE, SCALES

QUANTIZED = ("experts", "mlp", "attention")  # classes always quantized; "lm_head" on request
AGREEMENT = {"int8": 0.98, "int4": 0.85}  # top-1 agreement with fp32 transformers that verify asks of a build
KEPT = ("router", "gate", "embedding", "norm", "other")
# families with no quantized form, and why (refused before any work rather than built half quantized)
NO_QUANTIZED_FORM = {
    "gpt_oss": "its experts (interleaved, biased gate/up) reach their MatMuls through Slice and Expand in the "
               "portable lowerings, which the block quantizer does not rewrite, and the ort form does not serve it",
}
# config fields that are the K (input features) of the quantized projections: each must divide by the block
K_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
            "q_lora_rank", "kv_lora_rank")  # the last two: DeepSeek's latent attention (q_b_proj, kv_b_proj)


@dataclasses.dataclass(frozen=True)
class Quantization:
    scheme: str  # "int8" | "int4"
    block_size: int = DEFAULT_BLOCK_SIZE
    lm_head: bool = False
    scale_dtype: str = "fp16"
    scales: str = "absmax"  # how a block's scale is chosen (packing.SCALES); the ONNX rewrite's absmax recovers either

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    def quantizes(self, weight_class: str) -> bool:
        return weight_class in QUANTIZED or (self.lm_head and weight_class == "lm_head")

    def record(self) -> dict[str, Any]:
        """The manifest's `quantization` entry (onnx_rewrite adds the per-class bytes and ops)."""
        return {"scheme": self.scheme, "bits": self.bits, "block_size": self.block_size, "method": "rtn_symmetric",
                "scales": self.scales, "scale_dtype": self.scale_dtype, "lm_head": self.lm_head,
                "quantized": [*QUANTIZED, *(["lm_head"] if self.lm_head else [])]}


def weight_class(module_path: str) -> str:
    """The class of the weight a module owns, from its qualified name (torch's `named_modules`, or the
    ONNX exporter's name scopes, which start with the decoder step's `model.`)."""
    parts = module_path.split(".")
    last = parts[-1] if parts else ""
    if "lm_head" in parts:
        return "lm_head"
    if any("embed" in p for p in parts):
        return "embedding"
    if "experts" in parts:
        return "experts"
    if last in ("gate", "router") or "router" in parts:
        return "router"
    if "gate" in last and "proj" not in last:  # a shared expert's gate (shared_expert_gate)
        return "gate"
    if "norm" in last:
        return "norm"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "shared_expert", "shared_experts", "shared_mlp", "block_sparse_moe", "feed_forward")
           or p.startswith("shared") for p in parts):
        return "mlp"
    return "other"


def check_request(quantize: str | None, block_size: int | None, lm_head: bool, form: str,
                  lowering: str | None, scales: str | None = None) -> Quantization | None:
    """Refuse a bad --quantize request before any work (what the checkpoint's config is not needed for)."""
    if quantize is None:
        if block_size is not None or lm_head or scales is not None:
            raise RequestError("--block-size, --scales and --quantize-lm-head need --quantize int8|int4")
        return None
    if quantize not in BITS:
        raise RequestError(f"unknown --quantize '{quantize}'; choose one of {', '.join(BITS)}")
    scales = scales or SCALES[0]
    if scales not in SCALES:
        raise RequestError(f"unknown --scales '{scales}'; choose one of {', '.join(SCALES)}")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size not in BLOCK_SIZES:
        raise RequestError(f"--block-size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if lowering == "fused" and form == "portable":
        raise RequestError("--quantize has no portable form of --lowering fused (com.microsoft:MoE takes float "
                           "weights); build with --form ort (QMoE) or --lowering auto|gather|dense")
    return Quantization(quantize, block_size, lm_head, scales=scales)


def check_config(quantization: Quantization | None, checkpoint, model_type: str) -> None:
    """Refuse a family with no quantized form, and a block size that does not divide the projections' input
    sizes, before the weights load (reads the checkpoint's config.json as plain JSON)."""
    if quantization is None:
        return
    if model_type in NO_QUANTIZED_FORM:
        raise RequestError(f"{model_type}: --quantize has no form for this family: {NO_QUANTIZED_FORM[model_type]}")
    import json
    from pathlib import Path

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    text = config.get("text_config", config)
    sizes = {f: text[f] for f in K_FIELDS if isinstance(text.get(f), int) and text[f] > 0}
    heads = text.get("num_attention_heads")
    for dim in ("head_dim", "v_head_dim"):  # o_proj's K: the heads' outputs (v_head_dim in latent attention)
        if isinstance(heads, int) and isinstance(text.get(dim), int):
            sizes[f"num_attention_heads x {dim}"] = heads * text[dim]
    bad = {f: n for f, n in sizes.items() if n % quantization.block_size}
    if bad:
        field, n = next(iter(bad.items()))
        raise RequestError(f"{model_type}: --block-size {quantization.block_size} does not divide {field} = {n}; "
                           f"choose a block size among {', '.join(map(str, BLOCK_SIZES))} that does")


def bytes_table(record: dict[str, Any]) -> list[str]:
    """`inspect`'s lines: initializer bytes per weight class before and after quantization."""
    activations = f", int8 activations (accuracy_level {record['accuracy_level']})" if record.get("accuracy_level") else ""
    lines = [f"quantization: {record['scheme']}, block {record['block_size']}, {record['scale_dtype']} "
             f"{record.get('scales', 'absmax')} scales, "
             f"{', '.join(f'{op} {n}' for op, n in record['ops'].items())}{activations}",
             f"{'weights':12} {'before':>14} {'after':>14}"]
    rows = record["bytes"]
    for name, row in [*rows.items(), ("total", {k: sum(r[k] for r in rows.values()) for k in ("before", "after")})]:
        lines.append(f"{name:12} {row['before']:>14,} {row['after']:>14,}")
    lines += [f"unquantized  {name}: {why}" for name, why in record["unquantized"].items()]
    return lines
