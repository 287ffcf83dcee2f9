import numpy as np
import pytest

from moe_compile.errors import RequestError
from moe_compile.runtime.sampling import Sampling, next_tokens

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
