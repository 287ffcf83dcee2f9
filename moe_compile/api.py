"""Python API: `build(...)` a checkpoint and `load(OUT)` the result to generate text."""

from __future__ import annotations

import dataclasses
import numbers
import threading
from pathlib import Path
from typing import Callable, Sequence

from .build import build
from .errors import RequestError
from .export.manifest import read_manifest
from .runtime import BACKENDS, Sampling, Stats, generate
from .runtime import chat_template


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # the new tokens only (an EOS that stopped it is kept)
    text: str | None  # decoded new tokens, where the build has a tokenizer


class CompiledModel:
    def __init__(self, out: str | Path, backend: str = "ort", cuda_graph: bool = True):
        self.out = Path(out)
        self.manifest = read_manifest(self.out)
        if backend not in BACKENDS:
            raise RequestError(f"unknown backend '{backend}'; choose one of {', '.join(sorted(BACKENDS))}")
        self.backend = BACKENDS[backend](self.out, self.manifest, cuda_graph=cuda_graph).activate()
        self.tokenizer = None
        if self.manifest.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.out / "tokenizer")
        self.last_stats: Stats | None = None
        # One backend holds one KV cache: calls from several threads take turns.
        self._lock = threading.Lock()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.out} has no tokenizer: give prompts as token ids")
            if not prompt:
                raise RequestError("empty prompt: give some text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # undecodable bytes from argv or a file arrive as lone surrogates
                raise RequestError(f"the prompt is not valid UTF-8 text (at character {exc.start}); "
                                   "convert it to UTF-8 first") from None
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, (bytes, bytearray)):
            raise RequestError("a prompt given as bytes: decode it to a str, or give token ids as a list of ints")
        try:
            ids = list(prompt)
        except TypeError:
            raise RequestError(f"a prompt must be a str or a sequence of token ids, got {type(prompt).__name__}") from None
        wrong = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if wrong:
            raise RequestError(f"token ids must be ints, got {wrong[0]!r} ({type(wrong[0]).__name__})")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.manifest.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary 0..{self.manifest.vocab_size - 1}")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str | None:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else None

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stream: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Generate for prompts of any lengths (batched up to the build's max_batch at a time).
        `stream(prompt_index, token_id)` is called for each token as it is produced."""
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.encode(p) for p in prompts]
        eos = self.manifest.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        )
        results: list[list[int]] = []
        stats: list[Stats] = []
        size = self.manifest.max_batch
        with self._lock:
            for first in range(0, len(encoded), size):
                on_token = (lambda row, tok, base=first: stream(base + row, tok)) if stream else None
                tokens, batch_stats = generate(self.backend, encoded[first : first + size], max_new_tokens, sampling, eos,
                                               self.manifest.pad_token_id, on_token)
                results += tokens
                stats.append(batch_stats)
            self.last_stats = Stats.combine(stats)
        return [Generation(ids, self.decode(ids)) for ids in results]

    def chat(self, messages: Sequence[dict], max_new_tokens: int | None = None,
             stream: Callable[[int, int], None] | None = None, **options) -> Generation:
        """The assistant's reply to `messages` (transformers' chat format: [{"role": "user", "content": "..."}, ...]),
        the whole conversation rendered by the build's chat template. It stops at the checkpoint's end-of-turn
        tokens (generation_config.json's EOS ids, in the manifest); its text leaves them out. `max_new_tokens`
        defaults to what the build's max_seq leaves after the conversation; `stream` and `options` (temperature,
        top_k, top_p, repetition_penalty, seed, eos_token_id) are `generate`'s."""
        prompt = self.chat_prompt(messages)
        if max_new_tokens is None:
            max_new_tokens = self.manifest.max_seq - len(prompt)
            if max_new_tokens < 1:
                raise RequestError(f"the conversation ({len(prompt)} tokens) fills this build's max_seq "
                                   f"{self.manifest.max_seq}: start a new one, or rebuild with a larger --max-seq")
        return self.generate([prompt], max_new_tokens, stream=stream, **options)[0]

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The token ids the build's chat template makes of `messages`, ending where the assistant's reply starts."""
        self.check_chat()
        return chat_template.render(self.tokenizer, messages)

    def check_chat(self) -> None:
        """Refuse chat where the build kept no chat template."""
        chat_template.require(self.tokenizer, self.out)


def load(out: str | Path, backend: str = "ort", cuda_graph: bool = True) -> CompiledModel:
    """`cuda_graph=False`: run every step uncaptured (CUDA graphs are used by ort-cuda on ort-form builds)."""
    return CompiledModel(out, backend, cuda_graph)


__all__ = ["CompiledModel", "Generation", "build", "load"]
