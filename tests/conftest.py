"""Shared fixtures: tiny random-weight checkpoints of every registered family, written with
`save_pretrained` and loaded back through moe-compile's own loading code; builds cached per
(family variant, lowering, dtype) for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_compile.models import FAMILIES

# Family variants the parity matrix covers: every registered family, plus config switches
# that change the routing semantics.
VARIANTS = {name: spec.tiny_config for name, spec in FAMILIES.items()}
VARIANTS["qwen2_moe-renorm"] = dict(FAMILIES["qwen2_moe"].tiny_config, norm_topk_prob=True, mlp_only_layers=[],
                                    decoder_sparse_step=2)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["MOE_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from moe_compile.models.embedded import write_checkpoint

    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{variant}")
            write_checkpoint(VARIANTS[variant], path)
            made[variant] = path
        return made[variant]

    return make


@pytest.fixture(scope="session")
def built(checkpoint, tmp_path_factory):
    from moe_compile import build

    made: dict[tuple, Path] = {}

    def make(variant: str, lowering: str = "auto", dtype: str = "fp32", max_batch: int = 4, max_seq: int = 128) -> Path:
        key = (variant, lowering, dtype, max_batch, max_seq)
        if key not in made:
            out = tmp_path_factory.mktemp("build") / f"{variant}-{lowering}-{dtype}"
            made[key] = build(str(checkpoint(variant)), out, dtype=dtype, lowering=lowering, max_batch=max_batch,
                              max_seq=max_seq, progress=False)
        return made[key]

    return make
