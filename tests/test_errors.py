"""Bad input: one line naming the problem, non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error


def cli(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "moe_compile.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    return result.returncode, result.stderr.strip()


def test_unknown_hub_id_offline(tmp_path):
    out = tmp_path / "out"
    rc, err = cli("build", "nobody/no-such-model", "-o", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(rc, err, "nobody/no-such-model", "local checkpoint directory")
    assert not out.exists()


def test_unsupported_family_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, err = cli("build", str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "llama", "qwen2_moe", "mixtral")
    assert not (tmp_path / "out").exists()


def test_pickle_only_checkpoint_is_refused(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe"), ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    rc, err = cli("build", str(ckpt), "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "out").exists()


def test_out_that_is_not_a_build_is_kept(checkpoint, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = cli("build", str(checkpoint("qwen2_moe")), "-o", str(out))
    assert_one_line_error(rc, err, "not a previous moe-compile build")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args,words",
    [
        (["--prompt", ""], ["empty prompt"]),
        (["--input-ids", "1," * 200], ["exceeds", "max_seq"]),
        (["--input-ids", "1,2", "--top-p", "1.5"], ["top_p"]),
        (["--input-ids", "1,2", "--top-p", "0"], ["top_p"]),
        (["--input-ids", "1,2", "--temperature", "-1"], ["temperature"]),
        (["--input-ids", "1,2", "--top-k", "-3"], ["top_k"]),
        (["--input-ids", "1,x"], ["--input-ids"]),
        pytest.param(["--input-ids", "1,2", "--backend", "torch-cuda"], ["torch-cuda", "CUDA GPU"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")),
    ],
    ids=["empty-prompt", "too-long", "top-p-high", "top-p-zero", "negative-temperature", "negative-top-k", "bad-ids",
         "torch-cuda-without-gpu"],
)
def test_bad_run_requests(built, args, words):
    out = built("qwen2_moe", "auto")
    rc, err = cli("run", str(out), *args)
    assert_one_line_error(rc, err, *words)


@pytest.mark.parametrize("damage", ["missing-manifest", "corrupt-manifest", "missing-onnx", "corrupt-onnx"])
def test_damaged_build(built, tmp_path, damage):
    out = tmp_path / "copy"
    shutil.copytree(built("qwen2_moe", "auto"), out)
    what, name = damage.split("-")
    path = out / ("manifest.json" if name == "manifest" else "model.onnx")
    if what == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00garbage{")
    rc, err = cli("run", str(out), "--input-ids", "1,2,3")
    assert_one_line_error(rc, err, path.name)


def test_failed_build_keeps_previous_good_build(built, tmp_path):
    out = tmp_path / "good"
    shutil.copytree(built("qwen2_moe", "auto"), out)
    before = sorted(p.name for p in out.iterdir())
    rc, err = cli("build", "nobody/no-such-model", "-o", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert rc != 0
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".good")]  # no temporary left behind


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_build_check_catches_a_wrong_graph(built, dtype):
    """The build's check stage passes on a good build and fails when the ONNX and the program disagree."""
    from types import SimpleNamespace

    from moe_compile.build import check_build, check_reference
    from moe_compile.capture.decoder_step import kv_names
    from moe_compile.capture.trace import INPUT_NAMES
    from moe_compile.errors import MoeCompileError
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime.torch_backend import PROGRAM_FILE

    out = built("qwen2_moe", "auto", dtype)
    manifest = read_manifest(out)
    program = torch.export.load(str(out / PROGRAM_FILE))
    kv_shapes = [tuple(map(tuple, layer)) for layer in manifest.kv["layers"]]
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    captured = SimpleNamespace(kv_shapes=kv_shapes, dtype=dtypes[dtype],
                               input_names=INPUT_NAMES + kv_names(len(kv_shapes))[0])
    check_build(out, manifest, check_reference(manifest, program, captured))
    norm = next(t for name, t in program.state_dict.items() if name.endswith("model.norm.weight"))
    with torch.no_grad():
        norm.mul_(1.5)  # a wrong graph moves every position
    with pytest.raises(MoeCompileError, match="check failed"):
        check_build(out, manifest, check_reference(manifest, program, captured))


def test_build_without_torch_program(checkpoint, tmp_path):
    """--no-torch-program: no program.pt2 (nor in the manifest); ONNX Runtime runs it, the torch backend says why not."""
    out = tmp_path / "out"
    rc, err = cli("build", str(checkpoint("qwen2_moe")), "-o", str(out), "--max-seq", "32", "--backend", "onnx",
                  "--form", "portable", "--no-torch-program")
    assert rc == 0, err
    assert not (out / "program.pt2").exists()
    assert "program.pt2" not in json.loads((out / "manifest.json").read_text())["files"]
    rc, _ = cli("run", str(out), "--input-ids", "1,2,3", "--max-new-tokens", "2")
    assert rc == 0
    assert_one_line_error(*cli("run", str(out), "--input-ids", "1,2,3", "--backend", "torch"), "program.pt2",
                          "--no-torch-program")


def test_log_records_go_to_stderr_as_it_is_now(monkeypatch):
    # main() configures logging once; a later call under another stderr (a test's capture, an embedding
    # caller) must not write into the first one, closed by then ("--- Logging error ---" and a traceback)
    import io
    import logging

    from moe_compile.cli import main

    # as in a fresh process: no handlers on the root logger (pytest's logging plugin installs its own, and main()
    # leaves a configured root alone); the original list comes back after the test
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    main(["families"])
    first.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("moe_compile").warning("a warning")
    assert now.getvalue() == "a warning\n"
