import numpy as np
import pytest

from moe_compile.errors import RequestError
from moe_compile.runtime.sampling import Sampling, from_candidates, next_tokens

LOGITS = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)


def draw(sampling, logits=LOGITS):
    return next_tokens(logits, [[1, 2]] * len(logits), sampling, np.random.default_rng(sampling.seed))


def test_greedy_is_argmax():
    assert (draw(Sampling()) == LOGITS.argmax(-1)).all()


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    a = [draw(Sampling(temperature=1.0, seed=s)).tolist() for s in (1, 1, 2, 3, 4)]
    assert a[0] == a[1]
    assert len({tuple(x) for x in a}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert (draw(Sampling(temperature=1.0, top_k=1, seed=0)) == LOGITS.argmax(-1)).all()
    assert (draw(Sampling(temperature=1.0, top_p=1e-6, seed=0)) == LOGITS.argmax(-1)).all()


def test_top_k_stays_in_the_top_k():
    top3 = np.argsort(-LOGITS, -1)[:, :3]
    for seed in range(20):
        tokens = draw(Sampling(temperature=5.0, top_k=3, seed=seed))
        assert all(t in row for t, row in zip(tokens, top3))


def test_repetition_penalty_demotes_seen_tokens():
    logits = np.zeros((1, 4), np.float32)
    logits[0, 1] = 1.0
    logits[0, 2] = 0.9
    assert next_tokens(logits, [[1]], Sampling(repetition_penalty=2.0), np.random.default_rng(0))[0] == 2


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0)])
def test_bad_values(kwargs):
    with pytest.raises(RequestError):
        Sampling(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0, top_k=1), dict(temperature=0.5, top_k=4),
                                    dict(temperature=3.0, top_k=8), dict(temperature=1.0, top_k=6, top_p=0.7), dict()],
                         ids=["k1", "k4", "kC", "k6-p0.7", "greedy"])
def test_candidates_give_the_full_vocabulary_token_for_the_same_seed(kwargs):
    # ties on purpose: top-k keeps exactly k, ties to the lower id, as ONNX TopK orders its candidates
    logits = np.round(np.random.default_rng(1).normal(size=(4, 50)), 1).astype(np.float32)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :8]  # TopK(8): value descending, lower id first
    top_logits, top_ids = np.take_along_axis(logits, order, -1), order
    for seed in range(50):
        sampling = Sampling(seed=seed, **kwargs)
        full = next_tokens(logits, [[]] * 4, sampling, np.random.default_rng(seed))
        assert (from_candidates(top_logits, top_ids, sampling, np.random.default_rng(seed)) == full).all()


def test_candidates_refuse_what_needs_the_whole_row():
    with pytest.raises(RequestError, match="whole row"):
        from_candidates(LOGITS[:, :8], np.tile(np.arange(8), (3, 1)), Sampling(temperature=1.0, top_k=9),
                        np.random.default_rng(0))
