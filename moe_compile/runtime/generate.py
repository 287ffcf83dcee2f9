"""The one decode loop every backend shares: left-padded batch prefill, then one token per step."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ..errors import RequestError
from .backend import Backend
from .sampling import Chooser, Sampling


@dataclasses.dataclass
class Stats:
    prefill_ms: float
    decode_tokens_per_s: float  # all rows together
    new_tokens: int
    decode_s: float = 0.0

    @staticmethod
    def combine(parts: list[Stats]) -> Stats:
        """One call's figures over its sub-batches: times add up, the decode rate is over all of them."""
        decode_s = sum(p.decode_s for p in parts)
        decoded = sum(p.decode_tokens_per_s * p.decode_s for p in parts)
        return Stats(sum(p.prefill_ms for p in parts), decoded / decode_s if decode_s > 0 else 0.0,
                     sum(p.new_tokens for p in parts), decode_s)


def prefill(backend: Backend, prompts: list[list[int]], pad_id: int,
            chooser: Chooser | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad the prompts into one batch and run it; returns (each row's next token [B] as `chooser`
    picks it, or without a chooser the last position's logits [B, V]; the mask). A batch of more tokens
    than one run may take (manifest.max_run_tokens) runs in chunks of columns, each over the cache the
    previous ones filled: the same logits, and no tensor past 2^31 elements (passes/run_size.py)."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    backend.reset(len(prompts))
    limit = backend.manifest.max_run_tokens
    chunk = length if limit is None or backend.manifest.form == "ort" else max(1, limit // len(prompts))
    *before, last = range(0, length, chunk)
    for start in before:  # only the cache these chunks fill matters
        backend.step_last(ids[:, start : start + chunk], mask[:, : start + chunk], positions[:, start : start + chunk])
    return _step(backend, chooser, ids[:, last:], mask, positions[:, last:]), mask


def decode_one(backend: Backend, tokens: np.ndarray, mask: np.ndarray,
               chooser: Chooser | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feed one token per row; returns (next tokens [B], or without a chooser logits [B, V]; the extended mask)."""
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
    positions = mask.sum(axis=1, keepdims=True) - 1
    return _step(backend, chooser, tokens[:, None], mask, positions), mask


def _step(backend: Backend, chooser: Chooser | None, ids, mask, positions) -> np.ndarray:
    return backend.step_last(ids, mask, positions) if chooser is None else backend.step_tokens(ids, mask, positions, chooser)


def generate(
    backend: Backend,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos_ids: list[int],
    pad_id: int,
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[list[list[int]], Stats]:
    """New token ids per prompt (stopping after an EOS, which is kept), and timing."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RequestError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > backend.manifest.max_seq:
        raise RequestError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds this build's max_seq "
            f"{backend.manifest.max_seq}; rebuild with a larger --max-seq or ask for fewer tokens"
        )
    history = [list(p) for p in prompts]
    chooser = Chooser(sampling, history, np.random.default_rng(sampling.seed))
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    start = time.perf_counter()
    tokens, mask = prefill(backend, prompts, pad_id, chooser)
    prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    steps = 0
    while True:
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            history[row].append(token)
            if on_token:
                on_token(row, token)
            done[row] = token in eos_ids
        if done.all() or max(len(o) for o in outputs) >= max_new_tokens:
            break
        tokens, mask = decode_one(backend, np.where(done, pad_id, tokens), mask, chooser)
        steps += 1
    decode_s = time.perf_counter() - decode_start
    decoded = steps * len(prompts)
    rate = decoded / decode_s if decode_s > 0 and steps else 0.0
    return outputs, Stats(prefill_s * 1e3, rate, sum(map(len, outputs)), decode_s if steps else 0.0)
