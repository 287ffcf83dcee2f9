"""Shared fixtures: tiny random-weight checkpoints of every registered family, written with
`save_pretrained` and loaded back through moe-compile's own loading code; builds cached per
(family variant, lowering, dtype) once per test run, shared by pytest-xdist workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

# One CPU thread per pytest-xdist worker (CI: `-n auto`, a worker per core), set before torch loads, inherited by the
# CLI subprocesses. torch's OpenMP pool takes every core by default, so a worker's parallel regions wait for a core
# that the other worker's nvcc, engine builder or ONNX Runtime threads hold: a build beside one busy core took 108 s
# with 2 threads, 56 s with 1 (alone, 54 s and 57 s; transformers' greedy reference 8.5 s and 1.5 s).
_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import torch  # noqa: E402

from moe_compile.models import FAMILIES  # noqa: E402
from moe_compile.models.spec import Routing  # noqa: E402
from moe_compile.passes import LOWERINGS  # noqa: E402

if os.environ["OMP_NUM_THREADS"] == str(_THREADS):  # in case torch was loaded before this file
    torch.set_num_threads(_THREADS)

# Family variants the parity matrix covers: every registered family, plus config switches
# that change the routing semantics.
VARIANTS = {name: spec.tiny_config for name, spec in FAMILIES.items()}
VARIANTS["qwen2_moe-renorm"] = dict(FAMILIES["qwen2_moe"].tiny_config, norm_topk_prob=True, mlp_only_layers=[],
                                    decoder_sparse_step=2)


# Routings com.microsoft:MoE computes itself: the fused lowering's parity matrix runs there. Other routings
# reach the node computed by the graph (tests/test_fused.py: deepseek_v3 and phimoe; the ort form's tests run
# it for glm4_moe and phimoe).
FUSED_ROUTINGS = {Routing.SOFTMAX_TOPK, Routing.TOPK_SOFTMAX}


def ort_form_variants() -> list[str]:
    """The variants the ort form serves (derived from the registry: FamilySpec.ort_form_reason)."""
    from transformers import AutoConfig

    return [v for v in sorted(VARIANTS)
            if FAMILIES[VARIANTS[v]["model_type"]].ort_form_reason(AutoConfig.for_model(**VARIANTS[v])) is None]


# The lowerings alone. `auto`'s If holds the gather subgraph (every decode step: up to its threshold of
# tokens) and the dense one (the prompts), so every variant's auto build checks both decompositions on
# that family. Without the If, gather and dense run on the variants that span the experts op's forms:
# silu experts beside a gated shared expert (qwen2_moe), biased, clamped swiglu_oai (gpt_oss), latent
# attention with group-limited sigmoid routing (deepseek_v3). `fused` runs on both routings
# com.microsoft:MoE expresses, with and without renormalisation; the ort form runs the same MoE node for
# every family it serves (tests/test_ort_form.py). One build of each costs ~20 s of CI here.
STANDALONE_VARIANTS = {"qwen2_moe", "gpt_oss", "deepseek_v3"}
FUSED_VARIANTS = {"qwen2_moe", "qwen2_moe-renorm", "mixtral", "gpt_oss"}


def lowerings_for(variant: str) -> list[str]:
    """The lowerings the parity matrix covers for a variant: a dense model has no experts to lower."""
    spec = FAMILIES[VARIANTS[variant]["model_type"]]
    if spec.routing is Routing.NONE:
        return ["auto"]
    fused = variant in FUSED_VARIANTS and spec.routing in FUSED_ROUTINGS
    return [low for low in LOWERINGS
            if low == "auto" or (low == "fused" and fused) or (low != "fused" and variant in STANDALONE_VARIANTS)]


# The build each matrix test reads, named by its parameters. pyproject.toml runs pytest-xdist with `--dist
# loadgroup`: the tests of one build form one group, run one after another on one worker, so the first of them
# builds it and the others reuse it there. Spread over both workers, two tests of one build used to meet at
# its lock: one worker built while the other waited, idle, for the whole build (~50 s each, a dozen times a run).
# A test outside these still reads the same cached build; it is simply not grouped.
MATRIX_MODULES = {"test_parity.py": None, "test_trt.py": None, "test_fused.py": "fused", "test_ort_form.py": "ort"}


# The tests that load the fused-MoE kernel library, which nvcc builds on first use (~3 min of CI, every target
# architecture) under a file lock: one group, run after the build on its worker. Apart, the rebuild test waited for
# the lock on the other worker, idle, for the whole build (144 s of CI's 2594), as did the first ABI test.
KERNEL_LIBRARY_TESTS = {"test_build.py::test_builds_every_target_architecture",
                        "test_build.py::test_rebuild_is_skipped_when_sources_are_unchanged",
                        "test_library_abi.py", "test_trt_plugin.py::test_workspace_holds_fp32_logits_and_the_launcher_workspace"}


def build_group(item) -> str | None:
    """The name of the build a matrix test reads (or `kernel-library`), or None for any other test."""
    if item.path.name in KERNEL_LIBRARY_TESTS or f"{item.path.name}::{item.originalname}" in KERNEL_LIBRARY_TESTS:
        return "kernel-library"
    params = getattr(getattr(item, "callspec", None), "params", {})
    if item.path.name not in MATRIX_MODULES or "variant" not in params:
        return None
    kind = MATRIX_MODULES[item.path.name] or params.get("lowering", "auto")
    return f"build-{params['variant']}-{kind}-{params.get('dtype', 'fp32')}"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items):
    for item in items:  # before pytest-xdist's own hook reads the marks
        if group := build_group(item):
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    # pytest-xdist 3.8 appends "@group" to a test's id by writing item._nodeid, which pytest 9.2 no longer reads
    # (the id lives in item._id): without this, --dist loadgroup quietly schedules as --dist load.
    for item in items:
        suffixed = getattr(item, "_nodeid", None)
        if suffixed and suffixed != item.nodeid and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(suffixed)
    return result


def _shared_root(tmp_path_factory) -> Path:
    """One directory for every pytest-xdist worker of this run (the plain session dir without xdist),
    so checkpoints and builds are made once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(path: Path, make) -> Path:
    """Make `path` once across workers: the first takes the lock and builds, the others wait and reuse it."""
    with FileLock(str(path) + ".lock"):
        done = path.with_name(path.name + ".done")
        if not done.exists():
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["MOE_COMPILE_CACHE"] = str(_shared_root(tmp_path_factory) / "cache")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from moe_compile.models.embedded import write_checkpoint

    root = _shared_root(tmp_path_factory)

    def make(variant: str) -> Path:
        return _once(root / f"ckpt-{variant}", lambda path: write_checkpoint(VARIANTS[variant], path))

    return make


@pytest.fixture(scope="session")
def built(checkpoint, tmp_path_factory):
    from moe_compile import build

    root = _shared_root(tmp_path_factory)

    # backend="onnx" by default: no engine.plan unless a test asks (tests/test_trt.py builds engines itself).
    # form="ort": ONNX Runtime's in-place form (its MoE lowering is always the fused node; `lowering` is ignored).
    def make(variant: str, lowering: str = "auto", dtype: str = "fp32", max_batch: int = 4, max_seq: int = 128,
             backend: str = "onnx", form: str = "portable", quantize: str | None = None,
             scales: str | None = None) -> Path:
        lowering = "fused" if form == "ort" else lowering

        def run(out: Path) -> None:
            build(str(checkpoint(variant)), out, dtype=dtype, lowering=lowering, max_batch=max_batch,
                  max_seq=max_seq, progress=False, backend=backend, form=form, quantize=quantize, scales=scales)

        engine = "" if backend == "onnx" else f"-{backend}"
        name = f"build-{variant}-{lowering}-{dtype}-b{max_batch}-s{max_seq}{engine}" + ("-ort" if form == "ort" else "")
        name += f"-{quantize}" if quantize else ""
        name += f"-{scales}" if scales else ""
        return _once(root / name, run)

    return make


@pytest.fixture(scope="session")
def reference_tokens(checkpoint, tmp_path_factory):
    """transformers' greedy continuation of each prompt alone, computed once per variant and run (the
    same for every lowering), shared by pytest-xdist workers through a JSON file."""
    import hashlib
    import json

    import torch

    from moe_compile.models.loading import load_model

    root = _shared_root(tmp_path_factory)

    def make(variant: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        def run(path: Path) -> None:
            model = load_model(checkpoint(variant))
            tokens = []
            with torch.no_grad():
                for prompt in prompts:
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
                    tokens.append(out[0, len(prompt):].tolist())
            path.write_text(json.dumps(tokens))

        key = hashlib.sha1(json.dumps([prompts, new_tokens]).encode()).hexdigest()[:10]
        return json.loads(_once(root / f"reference-{variant}-{key}.json", run).read_text())

    return make


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    """A refused command: non-zero exit, exactly one stderr line (`error: ...`, naming `words`), no traceback."""
    assert rc != 0, err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err  # exactly one line: the error, nothing before it
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "internal error" not in last, err
    for word in words:
        assert word in last, last
