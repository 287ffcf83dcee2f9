"""Soak (issue 14): many generations in one process on one build, mixed prompt lengths, batch sizes and
sampling settings, with failing requests injected. Resident memory after the first 100 must stay flat
(within 5%), and every failed request must leave the next one working.

    python bench/soak.py OUT [--generations 1000] [--backend ort]
    python bench/soak.py --build tiny-qwen2-moe /tmp/soak-build    # build it first (max_seq 256)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import moe_compile
from moe_compile.errors import MoeCompileError

FLAT_WITHIN = 0.05
WARM = 100


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bad_request(model, rng: random.Random) -> dict:
    """One request that must fail with a MoeCompileError: (prompts, options)."""
    vocab, max_seq = model.manifest.vocab_size, model.manifest.max_seq
    return rng.choice([
        dict(prompts=[[1] * max_seq], max_new_tokens=4),  # too long
        dict(prompts=[[vocab + 5]], max_new_tokens=4),  # outside the vocabulary
        dict(prompts=[[1.5, 2.0]], max_new_tokens=4),  # floats as ids
        dict(prompts=[[]], max_new_tokens=4),  # empty
        dict(prompts=[[1, 2]], max_new_tokens=4, top_p=1.5),
        dict(prompts=[[1, 2]], max_new_tokens=4, seed=-1),
    ])


def good_request(model, rng: random.Random) -> dict:
    vocab, max_seq = model.manifest.vocab_size, model.manifest.max_seq
    batch = rng.choice([1, 1, 2, 3, model.manifest.max_batch, model.manifest.max_batch + 2])  # > max_batch: sub-batches
    new = rng.randint(1, 16)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_seq // 4))] for _ in range(batch)]
    sampling = rng.choice([{}, {"temperature": 0.8, "top_k": 20, "seed": rng.randrange(1000)},
                           {"temperature": 1.0, "top_p": 0.9, "seed": rng.randrange(1000)},
                           {"temperature": 0.7, "repetition_penalty": 1.2, "seed": 1}, {"temperature": 1e-30, "seed": 2}])
    return dict(prompts=prompts, max_new_tokens=min(new, max_seq - max(map(len, prompts))), **sampling)


def soak(out: str, generations: int, backend: str, seed: int = 14) -> dict:
    model = moe_compile.load(out, backend)
    rng = random.Random(seed)
    injected = survived = 0
    rss = {}
    for i in range(1, generations + 1):
        if rng.random() < 0.1:
            injected += 1
            request = bad_request(model, rng)
            try:
                model.generate(**request)
                raise AssertionError(f"request {request} did not fail")
            except MoeCompileError:
                pass
            # the next request must work
            model.generate([[1, 2, 3]], max_new_tokens=2)
            survived += 1
        else:
            request = good_request(model, rng)
            results = model.generate(**request)
            assert len(results) == len(request["prompts"])
        if i in (1, WARM) or i % 100 == 0:
            rss[i] = rss_bytes()
    steady = [v for k, v in rss.items() if k >= WARM]
    growth = (max(steady) - rss[WARM]) / rss[WARM]
    return {"build": out, "backend": backend, "generations": generations, "failures_injected": injected,
            "failures_survived": survived, "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
            "growth_after_warm_up": round(growth, 4), "flat": growth <= FLAT_WITHIN}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a build directory")
    parser.add_argument("--build", metavar="MODEL", help="build MODEL into OUT first (max_seq 256, max_batch 4)")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--backend", default="ort")
    args = parser.parse_args()
    if args.build:
        moe_compile.build(args.build, args.out, max_seq=256, max_batch=4, backend="onnx")
    record = soak(args.out, args.generations, args.backend)
    print(json.dumps(record, indent=2))
    return 0 if record["flat"] and record["failures_injected"] == record["failures_survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
