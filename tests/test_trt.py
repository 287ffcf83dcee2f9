"""TensorRT engines. On these machines TensorRT-RTX (installed by the test extra) builds engines ahead
of time on the CPU; no GPU it runs on exists here, so what runs is: every family x lowering builds
an engine whose network I/O and profiles match manifest.json, every refusal is one clear line, and
the GPU comparison with ONNX Runtime is skipped with the reason TensorRT gives."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from moe_compile.errors import RequestError
from moe_compile.export.manifest import read_manifest
from moe_compile.trt import compat, profiles
from moe_compile.trt.engine import EngineBuildError, build_engine, collecting_logger, io_mismatch, network_from_onnx, tensor_io

from conftest import VARIANTS, _once, _shared_root, lowerings_for
from test_errors import assert_one_line_error, cli

LOWERINGS = ("gather", "dense", "auto")
# The parity matrix's builds (conftest.lowerings_for: `auto` for every variant, whose If holds the gather and
# the dense subgraph; the lowerings alone on a few), fused aside: its engine needs our plugin.
FP32 = [(v, low, "fp32") for v in sorted(VARIANTS) for low in lowerings_for(v) if low in LOWERINGS]
# fp16 `auto` builds (each ~70 s of CI with its engine) for the attention forms furthest apart: the fp16 graph
# differs from the fp32 one in the attention's casts and the softmax dtype policy.
FP16 = [(v, "auto", "fp16") for v in ("deepseek_v3", "glm4_moe", "gpt_oss", "qwen2_moe")]
MATRIX = FP32 + FP16


@pytest.fixture(scope="module")
def tensorrt():
    return compat.load()  # the test extra installs tensorrt-rtx: its absence is a failure, not a skip


def expected_bounds(manifest) -> dict[str, dict[str, tuple[list[int], list[int]]]]:
    """The issue's profiles, written out independently of profiles.py: (min, max) per input."""
    b, seq = manifest.max_batch, manifest.max_seq
    kv = [hd for key, value in manifest.kv["layers"] for hd in (key, value)]
    past = [v["name"] for v in manifest.inputs if v["name"].startswith("past_key_values.")]
    prefill = {"input_ids": ([1, 1], [b, seq]), "position_ids": ([1, 1], [b, seq]), "attention_mask": ([1, 1], [b, seq])}
    decode = {"input_ids": ([1, 1], [b, 1]), "position_ids": ([1, 1], [b, 1]), "attention_mask": ([1, 1], [b, seq])}
    for name, (heads, dim) in zip(past, kv):
        prefill[name] = ([1, heads, 0, dim], [b, heads, 0, dim])
        decode[name] = ([1, heads, 0, dim], [b, heads, seq - 1, dim])
    return {"prefill": prefill, "decode": decode}


@pytest.mark.parametrize("variant,lowering,dtype", MATRIX, ids=["-".join(m) for m in MATRIX])
def test_engine_builds_and_matches_manifest(built, tensorrt, tmp_path, variant, lowering, dtype):
    out = built(variant, lowering, dtype)
    manifest = read_manifest(out)
    record = build_engine(out, manifest, tensorrt, plan_path=tmp_path / "engine.plan")
    assert record["bytes"] == (tmp_path / "engine.plan").stat().st_size > 0
    assert (record["package"], record["version"], record["precision"]) == (tensorrt.package, tensorrt.version, dtype)

    # The network the engine was built from: names, modes, dtypes and dynamic dims of manifest.json.
    builder, network, _parser = network_from_onnx(tensorrt, out / "model.onnx", collecting_logger(tensorrt))
    io = tensor_io(tensorrt, network)
    assert io_mismatch(io, manifest) is None
    kv_dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
    assert {v["dtype"] for n, v in io.items() if n.startswith(("past_key_values.", "present."))} == {kv_dtype}
    assert io["logits"]["dtype"] == "float32" and io["input_ids"] == {"mode": "input", "dtype": "int64", "shape": [-1, -1]}

    # Both profiles, as recorded for the runtime, bound exactly as the issue defines them.
    for name, bounds in expected_bounds(manifest).items():
        recorded = record["profiles"][name]
        assert set(recorded) == set(bounds)
        for tensor, (low, high) in bounds.items():
            assert (recorded[tensor][0], recorded[tensor][2]) == (low, high), (name, tensor)
            assert all(lo <= o <= hi for lo, o, hi in zip(*recorded[tensor])), (name, tensor)
    # fp16 is strongly typed from an fp16 ONNX: the norms' arithmetic is among what stays fp32.
    assert bool(record["fp32_ops"]) == (dtype != "fp32")
    if dtype != "fp32":
        assert any("Norm" in module for module in record["fp32_ops"]), record["fp32_ops"]


def test_parser_error_names_node_and_op(built, tensorrt, tmp_path):
    source = built("qwen2_moe", "auto")
    model = onnx.load(str(source / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "NoSuchOp"
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(EngineBuildError) as error:
        build_engine(tmp_path, read_manifest(source), tensorrt, plan_path=tmp_path / "engine.plan")
    message = str(error.value)
    assert f"node '{node.name}' (NoSuchOp)" in message and "\n" not in message, message
    assert not (tmp_path / "engine.plan").exists()


def test_io_mismatch_names_the_difference(built, tensorrt):
    out = built("qwen2_moe", "auto")
    manifest = read_manifest(out)
    _, network, _parser = network_from_onnx(tensorrt, out / "model.onnx", collecting_logger(tensorrt))
    io = tensor_io(tensorrt, network)
    renamed = json.loads(json.dumps(io).replace('"present.0.key"', '"present.0.k"'))
    assert "present.0.key" in io_mismatch(renamed, manifest)
    io["past_key_values.1.value"]["dtype"] = "float16"
    assert "past_key_values.1.value' is dtype float16" in io_mismatch(io, manifest)
    io["past_key_values.1.value"]["dtype"] = "float32"
    io["logits"]["shape"][-1] += 1
    assert "'logits' is shape" in io_mismatch(io, manifest)


def test_profile_choice_and_bounds(built):
    manifest = read_manifest(built("qwen2_moe", "auto"))
    shapes = profiles.profile_shapes(manifest)
    b, seq = manifest.max_batch, manifest.max_seq
    past = [v["name"] for v in manifest.inputs if v["name"].startswith("past_key_values.")]
    kv = list(zip(past, [hd for key, value in manifest.kv["layers"] for hd in (key, value)]))

    def step(batch, new, past):
        return {"input_ids": (batch, new), "position_ids": (batch, new), "attention_mask": (batch, past + new),
                **{n: (batch, h, past, d) for n, (h, d) in kv}}

    assert profiles.pick(shapes, step(b, seq, 0)) == 0  # the longest prompt, whole batch: prefill
    assert profiles.pick(shapes, step(1, 1, seq - 1)) == 1  # the last token of a full cache: decode
    for bad, words in [(step(b + 1, 1, 0), f"batch {b + 1} "), (step(1, 2, 5), "2 new tokens after 5"), (step(1, 1, seq), "after")]:
        with pytest.raises(RequestError, match=words):
            profiles.pick(shapes, bad)


@pytest.fixture(scope="session")
def engine_build(checkpoint, tmp_path_factory):
    """One build through the CLI with the engine: --fp16 shorthand, --backend trt, --timing-cache. Made once per
    run and shared by the pytest-xdist workers (conftest._once), its output kept beside it for the tests."""
    def make(root):
        root.mkdir()
        out, cache = root / "qwen2_moe-fp16", root / "timing.cache"
        result = subprocess.run([sys.executable, "-m", "moe_compile.cli", "build", str(checkpoint("qwen2_moe")), "-o",
                                 str(out), "--fp16", "--backend", "trt", "--max-batch", "4", "--max-seq", "128",
                                 "--timing-cache", str(cache)], capture_output=True, text=True, timeout=900)
        (root / "result.json").write_text(json.dumps(
            {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}))

    root = _once(_shared_root(tmp_path_factory) / "trt-engine-build", make)
    result = SimpleNamespace(**json.loads((root / "result.json").read_text()))
    assert result.returncode == 0, result.stderr
    return root / "qwen2_moe-fp16", result, root / "timing.cache"


ENGINE_BUILD_GROUP = pytest.mark.xdist_group("trt-engine-build")  # its tests on one worker: none waits for the build


@ENGINE_BUILD_GROUP
def test_build_writes_engine_and_manifest_record(engine_build):
    out, result, cache = engine_build
    assert re.search(r"export +[\d.]+ s", result.stderr) and re.search(r"engine +[\d.]+ s", result.stderr), result.stderr
    assert f"built {out} in" in result.stdout
    manifest = read_manifest(out)
    assert manifest.dtype == "fp16" and manifest.files[0] == "model.onnx" and "engine.plan" in manifest.files
    assert manifest.engine["bytes"] == (out / "engine.plan").stat().st_size
    # TensorRT-RTX has no timing cache: said so, nothing written, nothing recorded.
    assert "no timing cache" in result.stderr and not cache.exists() and manifest.engine["timing_cache"] is None


@ENGINE_BUILD_GROUP
def test_inspect_plan(engine_build):
    out, _, _ = engine_build
    result = subprocess.run([sys.executable, "-m", "moe_compile.cli", "inspect", str(out / "engine.plan")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "ops: " in text and "engine engine.plan: tensorrt_rtx" in text and "fp16 strongly typed" in text
    assert "profile prefill: input_ids [1, 1]..[4, 128]" in text and "profile decode: input_ids [1, 1]..[4, 1]" in text
    assert "fp32 in this fp16 engine: " in text
    assert "engine layers: not inspectable here (no CUDA GPU here" in text  # on a CPU machine


def run_cli(capsys, *args):
    """The CLI in this process (test_errors runs subprocesses; these refusals come before any model work)."""
    from moe_compile.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err.strip()


def _edited(out, tmp_path, **engine):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["engine"].update(engine)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@ENGINE_BUILD_GROUP
def test_run_refusals(engine_build, built, tensorrt, tmp_path, capsys):
    out, _, _ = engine_build
    plan = str(out / "engine.plan")
    reason = _gpu_reason(tensorrt)
    if reason:  # where a GPU runs it, test_trt_matches_ort runs the plan instead
        rc, err = run_cli(capsys, "run", plan, "--input-ids", "1,2")
        assert_one_line_error(rc, err, reason)
    rc, err = run_cli(capsys, "run", plan, "--input-ids", "1,2", "--backend", "ort")
    assert_one_line_error(rc, err, "--backend trt")

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(plan, lonely / "engine.plan")
    rc, err = run_cli(capsys, "run", str(lonely / "engine.plan"), "--input-ids", "1,2")
    assert_one_line_error(rc, err, "no manifest.json beside it")

    rc, err = run_cli(capsys, "run", str(built("qwen2_moe", "auto")), "--input-ids", "1,2", "--backend", "trt")
    assert_one_line_error(rc, err, "has no engine.plan", "--backend trt")

    other = "1.6.0.1"
    rc, err = run_cli(capsys, "run", str(_edited(out, tmp_path / "v", version=other) / "engine.plan"), "--input-ids", "1,2")
    assert_one_line_error(rc, err, f"built by tensorrt_rtx {other}", "rebuild")

    rc, err = run_cli(capsys, "run", str(_edited(out, tmp_path / "p", package="tensorrt") / "engine.plan"), "--input-ids", "1,2")
    assert_one_line_error(rc, err, "built by tensorrt", "pip install 'moe-compile[tensorrt]'")

    swapped = _edited(out, tmp_path / "s")
    with open(swapped / "engine.plan", "ab") as f:
        f.write(b"\0")
    rc, err = run_cli(capsys, "run", str(swapped / "engine.plan"), "--input-ids", "1,2")
    assert_one_line_error(rc, err, "engine.plan", "truncated or replaced")  # the manifest's file sizes, on every load


def _gpu_reason(tensorrt) -> str | None:
    try:
        tensorrt.check_gpu({})
    except compat.CannotRun as exc:
        return str(exc)
    return None


# An environment without TensorRT: a None entry in sys.modules makes find_spec and import both miss it.
_HIDE_TENSORRT = """
import sys
sys.modules.update(tensorrt=None, tensorrt_rtx=None)
from moe_compile.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_backend_trt_without_tensorrt_fails_before_work(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", _HIDE_TENSORRT, "build", str(checkpoint("qwen2_moe")), "-o", str(out),
                             "--backend", "trt"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr.strip(), "no TensorRT is installed",
                          "pip install 'moe-compile[tensorrt]'", "'moe-compile[tensorrt-rtx]'")
    assert "load" not in result.stderr and not out.exists()


def test_fused_with_tensorrt_rtx_fails_before_work(checkpoint, tensorrt, tmp_path):
    assert tensorrt.rtx
    rc, err = cli("build", str(checkpoint("qwen2_moe")), "-o", str(tmp_path / "out"), "--lowering", "fused", "--backend", "trt")
    assert_one_line_error(rc, err, "fused", "tensorrt_rtx", "--lowering auto")
    assert not (tmp_path / "out").exists()


def test_trt_matches_ort(built, tensorrt):
    """32 greedy tokens from the TensorRT and ONNX Runtime backends: fp32 identical, fp16 top-1 >= 99%."""
    reason = _gpu_reason(tensorrt)
    if reason:
        pytest.skip(f"TensorRT cannot run engines here: {reason}")
    from moe_compile import load

    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 120], [300, 12], [9, 9, 64, 200, 31]]
    fp32 = built("qwen2_moe", "auto", "fp32", backend="trt")
    ours = [g.token_ids for g in load(fp32, "trt").generate(prompts, max_new_tokens=32)]
    assert ours == [g.token_ids for g in load(fp32, "ort").generate(prompts, max_new_tokens=32)]

    fp16 = built("qwen2_moe", "auto", "fp16", backend="trt")
    sequence = prompts[0] + ours[0]  # teacher-forced: both backends see the same tokens
    tops = []
    for backend in ("trt", "ort"):
        model = load(fp16, backend)
        model.backend.reset(1)
        ids = np.array([sequence])
        tops.append(model.backend.step(ids, np.ones_like(ids), np.arange(len(sequence))[None]).argmax(-1)[0])
    agreement = float(np.mean(tops[0][len(prompts[0]) - 1:] == tops[1][len(prompts[0]) - 1:]))
    assert agreement >= 0.99, agreement
