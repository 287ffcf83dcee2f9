"""Embedded models: configs shipped in the package, materialised on first use as ordinary HF
checkpoint directories (random weights from a fixed seed, safetensors, a small byte-level BPE
tokenizer) so that every later step goes through the real loading code."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from .spec import FAMILIES

SEED = 0
CACHE_VERSION = 2  # of what write_checkpoint writes (2: the chat template): a cache of another version is not reused
# Every embedded tokenizer's chat template, so that `run --chat` works on the demo: the EOS token ends a turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant\n' }}{% endif %}"
)

# name -> (config fields, tokenizer vocabulary size)
_DEMO = dict(
    model_type="qwen2_moe",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=256,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    max_position_embeddings=2048,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
# The CPU benchmark model (issue 3): the shape llama.cpp and the other peers are measured on.
_BENCH = dict(
    model_type="qwen2_moe",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=1024,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    max_position_embeddings=4096,
    initializer_range=0.02,
    tie_word_embeddings=False,
)

# DeepSeek-V3's shape scaled down to fit the CPU (issue 7): latent attention, sigmoid + bias routing
# in 8 groups (top-4 groups, top-6 of 64 experts), one shared expert, the first layer dense.
_DEEPSEEK_V3_BENCH = dict(
    model_type="deepseek_v3",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=384,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=1,
    n_group=8,
    topk_group=4,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    max_position_embeddings=4096,
    initializer_range=0.02,
    tie_word_embeddings=False,
)

EMBEDDED: dict[str, dict] = {
    "qwen2-moe-demo": _DEMO,
    "qwen2-moe-bench": _BENCH,
    "deepseek-v3-bench": _DEEPSEEK_V3_BENCH,
}
EMBEDDED.update({f"tiny-{name.replace('_', '-')}": spec.tiny_config for name, spec in FAMILIES.items()})


def cache_dir() -> Path:
    root = os.environ.get("MOE_COMPILE_CACHE") or Path.home() / ".cache" / "moe-compile"
    return Path(root) / f"embedded-{CACHE_VERSION}"


def materialize(name: str) -> Path:
    """Create the embedded checkpoint once (atomically) and return its directory."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_checkpoint(EMBEDDED[name], tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_checkpoint(fields: dict, out: Path, seed: int = SEED) -> None:
    """Save a random-weight model of this config plus a tokenizer as a HF checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    tokenizer = build_tokenizer(min(fields["vocab_size"], 1024))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    fields.setdefault("eos_token_id", eos)
    fields.setdefault("bos_token_id", eos)
    fields.setdefault("pad_token_id", eos)
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_zero_biases(model, config.initializer_range)
    model.generation_config.eos_token_id = fields["eos_token_id"]
    model.generation_config.pad_token_id = fields["pad_token_id"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _randomize_zero_biases(model, std: float) -> None:
    """transformers initialises biases (experts', QKV, routing correction) to zero; random ones make the
    parity tests exercise them instead of adding zeros."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("bias") and tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0.0, std)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a small text shipped with the package: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files(__package__).joinpath("corpus.txt").read_text().splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
