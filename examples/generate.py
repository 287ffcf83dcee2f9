"""The Python API in a few lines: build the embedded demo model, load it, generate for a batch.

    python examples/generate.py [OUT]
"""

import sys

import moe_compile

out = sys.argv[1] if len(sys.argv) > 1 else "out/example"
moe_compile.build("qwen2-moe-demo", out, lowering="auto", max_batch=4, max_seq=256)
model = moe_compile.load(out)  # ONNX Runtime backend; load(out, backend="torch") runs the captured program

prompts = ["Hello world", "A mixture of experts replaces one large block", [101, 7, 42]]  # text or token ids
results = model.generate(
    prompts,
    max_new_tokens=24,
    temperature=0.8,
    top_p=0.9,
    seed=0,
    stream=lambda row, token: None,  # called for every token as it is produced
)
for prompt, result in zip(prompts, results):
    print(f"{prompt!r} -> {result.token_ids[:8]}... {result.text!r}")
stats = model.last_stats
print(f"prefill {stats.prefill_ms:.1f} ms, decode {stats.decode_tokens_per_s:.0f} tokens/s")
