"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty. Seeded through one numpy
Generator per generate call, so runs are reproducible.

The choice is written once, over (logits, token ids) rows in ascending id order: the full vocabulary
(`next_tokens`), or a graph's top-C candidates sorted by id (`from_candidates`). Tokens outside the
candidates would have probability zero, and zeros change neither a cumulative sum nor a stable order,
so both give the same token for the same seed whenever top_k <= C. Top-k keeps exactly k tokens, ties
going to the lower id, as ONNX TopK orders them.
"""

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
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise RequestError(f"seed must be a non-negative integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Chooser:
    """The decode loop's sampling state; a backend calls it with what its step produced. `Chooser()` is greedy."""

    sampling: Sampling = Sampling()
    history: list[list[int]] = dataclasses.field(default_factory=list)  # each row's tokens so far (for the penalty)
    rng: np.random.Generator | None = None  # needed unless greedy

    def reads(self, candidates: int) -> str:
        """What the choice needs from a graph that also outputs argmax and the top `candidates`:
        "argmax", "top" (top_logits/top_ids) or "logits" (the whole row)."""
        s = self.sampling
        if s.repetition_penalty != 1.0:
            return "logits"
        if s.greedy:
            return "argmax"
        return "top" if 1 <= s.top_k <= candidates else "logits"

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return next_tokens(logits, self.history, self.sampling, self.rng)

    def from_candidates(self, top_logits: np.ndarray, top_ids: np.ndarray) -> np.ndarray:
        return from_candidates(top_logits, top_ids, self.sampling, self.rng)


def next_tokens(logits: np.ndarray, history: list[list[int]], sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] float32 -> token ids [B]."""
    logits = logits.astype(np.float32, copy=True)
    if sampling.repetition_penalty != 1.0:
        for row, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            scores = logits[row, ids]
            logits[row, ids] = np.where(scores > 0, scores / sampling.repetition_penalty, scores * sampling.repetition_penalty)
    return _choose(logits, np.broadcast_to(np.arange(logits.shape[-1]), logits.shape), sampling, rng)


def from_candidates(top_logits: np.ndarray, top_ids: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The top C logits of each row and their ids [B, C] -> token ids [B]: the token `next_tokens` picks
    from the whole row with the same rng, for top_k <= C and no repetition penalty."""
    if sampling.repetition_penalty != 1.0 or not (sampling.greedy or 1 <= sampling.top_k <= top_ids.shape[-1]):
        raise RequestError(f"the top {top_ids.shape[-1]} candidates cannot serve {sampling}: it needs the whole row")
    order = np.argsort(top_ids, axis=-1, kind="stable")
    return _choose(np.take_along_axis(top_logits, order, -1).astype(np.float32), np.take_along_axis(top_ids, order, -1),
                   sampling, rng)


def _choose(logits: np.ndarray, ids: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, K] of the tokens ids [B, K] (ascending per row) -> one of the ids per row."""
    rows = np.arange(len(logits))
    if sampling.greedy:
        return ids[rows, logits.argmax(axis=-1)]
    # Shifted by the row's best, then scaled in float64: any temperature > 0, however small, keeps the best
    # token's probability 1 rather than inf / inf = NaN.
    with np.errstate(over="ignore"):  # far below the best is -inf: probability 0, as it should be
        logits = ((logits - logits.max(axis=-1, keepdims=True)) / np.float64(sampling.temperature)).astype(np.float32)
    if sampling.top_k:
        keep = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(keep, np.argsort(-logits, axis=-1, kind="stable")[:, : sampling.top_k], True, axis=-1)
        logits = np.where(keep, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    if sampling.top_p < 1.0:
        # keep the smallest prefix, most likely first, whose mass reaches top_p (always the best token)
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.cumsum(np.take_along_axis(probs, order, axis=-1), axis=-1)
        drop_ranked = ranked - np.take_along_axis(probs, order, axis=-1) >= sampling.top_p * ranked[:, -1:]
        drop = np.zeros_like(drop_ranked)
        np.put_along_axis(drop, order, drop_ranked, axis=-1)
        probs = np.where(drop, 0.0, probs)
    # Unnormalised cumulative sums, ids ascending: zero-probability tokens add nothing anywhere.
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((len(probs), 1)) * cumulative[:, -1:]
    last = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)  # never past the last possible token
    return ids[rows, np.minimum((cumulative <= draws).sum(axis=-1), last)]
