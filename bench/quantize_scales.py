"""How close each way of choosing a block's scale (`--scales absmax|mse`) brings the tiny test models to fp32:
top-1 agreement and mean KL of the next-token distribution over 256 teacher-forced positions (4 prompts x 64 of
fp32 transformers' greedy continuation, as tests/test_quantize.py measures), the weights quantized and
dequantized in torch (packing.quantize_rows, the build's own fake_quantize), int4 and int8; and how long that
quantizing took (the build stage the choice of scales costs).

    python bench/quantize_scales.py [MODEL,...] [--schemes int4,int8] [--blocks 32]
        # MODEL: embedded models; default: tiny-FAMILY for every family with a quantized form;
        # qwen2-moe-bench: the CPU benchmark's. --blocks: the block sizes to compare (each with both scales)

Prints one JSON line per (model, scheme, scales). CPU only; ~1 minute a tiny model on two cores."""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_compile.models import FAMILIES
from moe_compile.models.embedded import EMBEDDED, write_checkpoint
from moe_compile.models.loading import load_model
from moe_compile.quantize import NO_QUANTIZED_FORM, Quantization
from moe_compile.quantize.packing import SCALES
from moe_compile.quantize.torch_weights import fake_quantize

PROMPTS = [np.random.default_rng(seed).integers(3, 500, 8).tolist() for seed in range(4)]
NEW_TOKENS = 64


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = torch.log_softmax(torch.from_numpy(p_logits), -1), torch.log_softmax(torch.from_numpy(q_logits), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


@torch.no_grad()
def measure(name: str, work: Path, schemes: list[str], blocks: list[int]) -> None:
    path = work / name
    write_checkpoint(EMBEDDED[name], path)
    reference = load_model(path)
    sequences, fp32 = [], []
    for prompt in PROMPTS:
        ids = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[0]
        sequences.append((ids, len(prompt)))
        fp32.append(reference(ids[None]).logits[0, len(prompt) - 1:-1].numpy())
    fp32 = np.concatenate(fp32)
    for scheme, block, scales in ((s, b, c) for s in schemes for b in blocks for c in SCALES):
        model = load_model(path)
        start = time.perf_counter()
        row = {"model": name, "scheme": scheme, "block_size": block, "scales": scales}
        try:
            fake_quantize(model, Quantization(scheme, block_size=block, scales=scales))
        except ValueError as exc:  # a projection whose K the block does not divide (the build refuses it too)
            print(json.dumps({**row, "skipped": str(exc)}), flush=True)
            continue
        quantize_s = time.perf_counter() - start
        logits = np.concatenate([model(ids[None]).logits[0, n - 1:-1].numpy() for ids, n in sequences])
        print(json.dumps({**row, "positions": len(fp32),
                          "top1_agreement_fp32": float((logits.argmax(-1) == fp32.argmax(-1)).mean()),
                          "kl_fp32": kl(fp32, logits), "quantize_s": quantize_s}), flush=True)


def main() -> None:
    default = ",".join(f"tiny-{f.replace('_', '-')}" for f in FAMILIES if f not in NO_QUANTIZED_FORM)
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="?", default=default)
    parser.add_argument("--schemes", default="int4,int8")
    parser.add_argument("--blocks", default="32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            measure(name, Path(work), args.schemes.split(","), [int(b) for b in args.blocks.split(",")])


if __name__ == "__main__":
    main()
