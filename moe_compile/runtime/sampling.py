"""Next-token choice from host logits: greedy, temperature, top-k, top-p, repetition penalty.
Seeded through one numpy Generator per generate call, so runs are reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import RequestError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: np.ndarray, history: list[list[int]], sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] float32 -> token ids [B]."""
    logits = logits.astype(np.float32, copy=True)
    if sampling.repetition_penalty != 1.0:
        for row, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            scores = logits[row, ids]
            logits[row, ids] = np.where(scores > 0, scores / sampling.repetition_penalty, scores * sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(axis=-1)
    logits /= sampling.temperature
    if sampling.top_k:
        kth = np.sort(logits, axis=-1)[:, -min(sampling.top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)
