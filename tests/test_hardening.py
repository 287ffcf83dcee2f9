"""Issue 14: every bad checkpoint, build, manifest or request ends in one error line, a non-zero exit, no
traceback and no half-written output. Cases are tables: adding one is one line.

Most cases call the CLI's `main` in this process (an exception escaping it fails the test, as a traceback
would); signals, pipes and start-up run it as a subprocess. One cached build serves every manifest case,
copied to tmp_path."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_compile.cli import main
from moe_compile.errors import ArtifactError, RequestError
from conftest import assert_one_line_error

RUN = ["--input-ids", "1,2,3", "--max-new-tokens", "2"]


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # what came before (a session fixture writing its checkpoint) is not the command's
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


@pytest.fixture
def build_copy(built, tmp_path):
    """A fresh copy of one cached portable build (qwen2_moe, max_seq 128, max_batch 4)."""
    out = tmp_path / "build"
    shutil.copytree(built("qwen2_moe", "auto"), out)
    return out


def edit_manifest(out: Path, change) -> None:
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- manifest.json, read by run/verify/inspect/bench ------------------------------------------------------

def _set(key, value):
    def change(data):
        data[key] = value
    return change


MANIFEST_CASES = {
    "max-seq-string": (_set("max_seq", "2048"), ["max_seq", "valid integer"]),
    "max-seq-zero": (_set("max_seq", 0), ["max_seq"]),
    "max-seq-negative": (_set("max_seq", -4), ["max_seq"]),
    "max-seq-huge": (_set("max_seq", 10**12), ["max_position_embeddings"]),
    "max-batch-float": (_set("max_batch", 4.0), ["max_batch"]),
    "format-int": (_set("format", 1), ["format"]),
    "format-older": (_set("format", "moe-compile/1"), ["moe-compile/1", "rebuild"]),
    "format-newer": (_set("format", "moe-compile/99"), ["moe-compile/99", "upgrade"]),
    "format-foreign": (_set("format", "other/1"), ["not a moe-compile manifest"]),
    "dtype-unknown": (_set("dtype", "fp8"), ["dtype"]),
    "vocab-zero": (_set("vocab_size", 0), ["vocab_size"]),
    "pad-outside-vocab": (_set("pad_token_id", 10**6), ["outside the vocabulary"]),
    "eos-bool": (_set("eos_token_ids", [True]), ["eos_token_ids"]),
    "file-outside-build": (lambda d: d["files"].append("../model.onnx"), ["not a file name"]),
    "kv-layers-mismatch": (lambda d: d["kv"].update(num_layers=d["kv"]["num_layers"] + 1), ["kv.num_layers"]),
    "inputs-wrong-type": (_set("inputs", {"name": "x"}), ["inputs"]),
    "unknown-field": (_set("surprise", 1), ["surprise"]),
    "size-wrong": (lambda d: d["file_sizes"].update({"model.onnx": 1}), ["truncated or replaced"]),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_field(build_copy, capsys, case):
    change, words = MANIFEST_CASES[case]
    edit_manifest(build_copy, change)
    assert_one_line_error(*cli(capsys, "run", build_copy, *RUN), "manifest.json" if case != "size-wrong" else "model.onnx",
                          *words)


@pytest.mark.parametrize("content", [b"3", b'"a string"', b"[1, 2]", b"\xff\xfe{}", b"{"],
                         ids=["int", "string", "list", "not-utf8", "bad-json"])
@pytest.mark.parametrize("command", ["run", "inspect", "verify", "bench"])
def test_corrupt_manifest_every_reader(build_copy, capsys, content, command):
    (build_copy / "manifest.json").write_bytes(content)
    args = {"run": RUN, "bench": ["--new-tokens", "2", "--prompt-len", "4", "--repeats", "1"]}.get(command, [])
    assert_one_line_error(*cli(capsys, command, build_copy, *args), "manifest.json", "corrupt")


def test_python_load_reads_the_manifest_through_the_schema(build_copy):
    import moe_compile

    edit_manifest(build_copy, _set("max_seq", "2048"))
    with pytest.raises(ArtifactError, match="max_seq"):
        moe_compile.load(build_copy)


def test_manifest_fuzz(build_copy, capsys):
    """Seeded random type/value mutations of every field: each ends in a one-line error or a correct run."""
    good = json.loads((build_copy / "manifest.json").read_text())
    values = [None, True, 0, -1, 1, 2**40, 1.5, "", "x", "fp16", [], [1], {}, {"a": 1}, float("nan")]
    rng = random.Random(14)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = json.loads(json.dumps(good))
        key = rng.choice(sorted(data))
        data[key] = rng.choice(values)
        (build_copy / "manifest.json").write_text(json.dumps(data))
        rc, err = cli(capsys, "run", build_copy, *RUN)
        if rc == 0:
            outcomes["ok"] += 1
        else:
            assert_one_line_error(rc, err)
            outcomes["error"] += 1
    assert outcomes["error"] > 200, outcomes


# --- integrity: files beside the manifest ---------------------------------------------------------------

def test_model_from_another_build_is_refused(build_copy, capsys):
    with open(build_copy / "model.onnx", "ab") as f:
        f.write(b"\0" * 16)
    assert_one_line_error(*cli(capsys, "run", build_copy, *RUN), "model.onnx", "truncated or replaced")


def test_inspect_and_verify_check_the_checksum(build_copy, capsys):
    data = bytearray((build_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, another content
    (build_copy / "model.onnx").write_bytes(bytes(data))
    assert_one_line_error(*cli(capsys, "inspect", build_copy), "sha256")
    assert_one_line_error(*cli(capsys, "verify", build_copy), "sha256")


def test_inspect_refuses_an_empty_model(build_copy, capsys):
    (build_copy / "model.onnx").write_bytes(b"")
    assert_one_line_error(*cli(capsys, "inspect", build_copy), "model.onnx")


def test_inspect_checks_external_data(build_copy, capsys):
    """A build whose weights are in model.onnx.data: inspect passes, then refuses it truncated."""
    import onnx

    from moe_compile.export.manifest import Manifest

    model = onnx.load(str(build_copy / "model.onnx"))
    onnx.save(model, str(build_copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    manifest = Manifest.model_validate_json((build_copy / "manifest.json").read_text())
    manifest.files.append("model.onnx.data")
    manifest.write(build_copy)
    assert cli(capsys, "inspect", build_copy)[0] == 0
    data = build_copy / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    edit_manifest(build_copy, lambda d: d["file_sizes"].update({"model.onnx.data": size // 2}))  # sizes agree
    assert_one_line_error(*cli(capsys, "inspect", build_copy), "model.onnx.data", "truncated")


# --- checkpoint config.json, checked before anything loads ----------------------------------------------

def _config(**changes):
    from moe_compile.models import FAMILIES

    return {**FAMILIES["qwen2_moe"].tiny_config, **changes}


CONFIG_CASES = {
    "list": (b"[1, 2]", ["not an object"]),
    "string": (b'"qwen2_moe"', ["not an object"]),
    "not-utf8": (b"\xff\xfe{}", ["not UTF-8"]),
    "model-type-list": (_config(model_type=["qwen2_moe"]), ["model_type"]),
    "layers-negative": (_config(num_hidden_layers=-1), ["num_hidden_layers"]),
    "layers-zero": (_config(num_hidden_layers=0), ["num_hidden_layers"]),
    "layers-string": (_config(num_hidden_layers="2"), ["num_hidden_layers"]),
    "vocab-zero": (_config(vocab_size=0), ["vocab_size"]),
    "hidden-huge": (_config(hidden_size=10**9), ["memory", "--force"]),
    "layers-huge": (_config(num_hidden_layers=100_000), ["memory", "--force"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_json(tmp_path, capsys, case):
    content, words = CONFIG_CASES[case]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    start = time.perf_counter()
    assert_one_line_error(*cli(capsys, "build", ckpt, "-o", tmp_path / "out"), "config", *words)
    assert time.perf_counter() - start < 30  # refused before anything is allocated
    assert not (tmp_path / "out").exists()


def test_disk_room_is_checked_before_any_work(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_config(hidden_size=10**6)))
    assert_one_line_error(*cli(capsys, "build", ckpt, "-o", tmp_path / "out", "--force"), "GiB free")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.building")]


def test_max_seq_beyond_positions(checkpoint, tmp_path, capsys):
    assert_one_line_error(*cli(capsys, "build", checkpoint("qwen2_moe"), "-o", tmp_path / "out", "--max-seq", 10**7),
                          "max_position_embeddings")


# --- safetensors ------------------------------------------------------------------------------------------

def _header(raw: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _damage(kind: str, raw: bytes) -> bytes:
    header, body = _header(raw)
    if kind == "truncated":
        return raw[: len(raw) // 2]
    if kind == "header-larger-than-file":
        return struct.pack("<Q", len(raw) * 10) + raw[8:]
    if kind == "bad-json":
        return struct.pack("<Q", 5) + b"{nope" + body
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, len(body) * 2]  # bad-offsets
    return _with_header(header, body)


@pytest.mark.parametrize("kind", ["truncated", "header-larger-than-file", "bad-json", "bad-offsets"])
def test_damaged_safetensors(checkpoint, tmp_path, capsys, kind):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe"), ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(_damage(kind, weights.read_bytes()))
    assert_one_line_error(*cli(capsys, "build", ckpt, "-o", tmp_path / "out"), "model.safetensors", "safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "unexpected"])
def test_weights_not_matching_the_config_are_refused(checkpoint, tmp_path, capsys, kind):
    """transformers would initialise a missing tensor at random and the build would succeed: silent garbage."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = sorted(n for n in tensors if "layers.1.self_attn.q_proj.weight" in n)[0]
    if kind == "missing":
        del tensors[name]
    else:
        tensors["model.layers.1.stray.weight"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    expected = name if kind == "missing" else "stray"
    assert_one_line_error(*cli(capsys, "build", ckpt, "-o", tmp_path / "out"), kind, expected)
    assert not (tmp_path / "out").exists()


# --- the check stage --------------------------------------------------------------------------------------

def test_check_fails_on_non_finite_logits(built):
    """NaN weights: NaN is never 'greater than the tolerance', so the check looks at finiteness itself."""
    from types import SimpleNamespace

    from moe_compile.build import check_build, check_reference
    from moe_compile.capture.decoder_step import kv_names
    from moe_compile.capture.trace import INPUT_NAMES
    from moe_compile.errors import MoeCompileError
    from moe_compile.export.manifest import read_manifest
    from moe_compile.runtime.torch_backend import PROGRAM_FILE

    out = built("qwen2_moe", "auto")
    manifest = read_manifest(out)
    program = torch.export.load(str(out / PROGRAM_FILE))
    kv_shapes = [tuple(map(tuple, layer)) for layer in manifest.kv["layers"]]
    captured = SimpleNamespace(kv_shapes=kv_shapes, dtype=torch.float32, input_names=INPUT_NAMES + kv_names(len(kv_shapes))[0])
    norm = next(t for name, t in program.state_dict.items() if name.endswith("model.norm.weight"))
    with torch.no_grad():
        norm.fill_(float("nan"))
    with pytest.raises(MoeCompileError, match="non-finite"):
        check_build(out, manifest, check_reference(manifest, program, captured))


def test_broken_tokenizer_is_reported(checkpoint, tmp_path):
    from moe_compile.build import save_tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe"), ckpt)
    (ckpt / "tokenizer.json").write_text("{broken")
    assert save_tokenizer(ckpt, tmp_path / "tok", False)
    assert not (tmp_path / "tok").exists()
    assert save_tokenizer(checkpoint("qwen2_moe"), tmp_path / "tok2", False) is None


# --- requests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--input-ids", "1,2", "--seed", "-1"], ["seed"]),
    (["--prompt", "caf\udce9"], ["UTF-8"]),  # undecodable argv bytes arrive as lone surrogates
], ids=["seed-negative", "prompt-not-utf8"])
def test_bad_run_requests(built, capsys, args, words):
    assert_one_line_error(*cli(capsys, "run", built("qwen2_moe", "auto"), *args), *words)


@pytest.mark.parametrize("count", ["0", "-3"])
def test_verify_new_tokens(built, capsys, count):
    assert_one_line_error(*cli(capsys, "verify", built("qwen2_moe", "auto"), "--new-tokens", count), "--new-tokens")


@pytest.mark.parametrize("prompt", [[1.7, 2.2], [True, 2], b"hi", [b"hi"], [np.bool_(True)]],
                         ids=["floats", "bools", "bytes", "bytes-in-list", "numpy-bool"])
def test_ids_of_other_types_are_refused(built, prompt):
    import moe_compile

    model = moe_compile.load(built("qwen2_moe", "auto"))
    with pytest.raises(RequestError):
        model.generate([prompt], max_new_tokens=1)
    assert model.generate([[np.int64(1), 2]], max_new_tokens=1)[0].token_ids  # numpy ints are ints


def test_tiny_temperature_is_greedy(built):
    import moe_compile

    model = moe_compile.load(built("qwen2_moe", "auto"))
    greedy = model.generate([[5, 6, 7]], max_new_tokens=6)[0].token_ids
    for temperature in (1e-40, 1e-300, 5e-324):
        assert model.generate([[5, 6, 7]], max_new_tokens=6, temperature=temperature, seed=0)[0].token_ids == greedy


def test_threads_share_one_model(built):
    import moe_compile

    model = moe_compile.load(built("qwen2_moe", "auto"))
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]
    expected = [g.token_ids for g in model.generate(prompts, max_new_tokens=4)]
    results, errors = [None] * 6, []

    def work(i):
        try:
            results[i] = [g.token_ids for g in model.generate(prompts, max_new_tokens=4)]
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected for r in results), errors


def test_last_stats_cover_every_sub_batch(built):
    import moe_compile

    model = moe_compile.load(built("qwen2_moe", "auto"))  # max_batch 4
    results = model.generate([[1, 2, 3]] * 6, max_new_tokens=3, eos_token_id=[])
    assert model.last_stats.new_tokens == sum(len(r.token_ids) for r in results) == 18
    assert model.last_stats.decode_tokens_per_s > 0


# --- memory: the KV cache a backend preallocates --------------------------------------------------------

KV_COPIES = {"portable": 2, "ort": 1}  # max_seq-long caches per KV tensor: past/present pair, in-place buffer


def _free_bytes(monkeypatch, free: int) -> None:
    monkeypatch.setattr("moe_compile.runtime.backend.free_bytes", lambda device: free)


@pytest.mark.parametrize("form", sorted(KV_COPIES))
def test_kv_cache_over_free_memory_is_refused(built, capsys, monkeypatch, form):
    from moe_compile.export.manifest import read_manifest

    out = built("qwen2_moe", form=form)
    need = KV_COPIES[form] * read_manifest(out).kv_cache_bytes(1)  # `run` of one prompt: batch 1
    _free_bytes(monkeypatch, need - 1)
    assert_one_line_error(*cli(capsys, "run", out, *RUN), "KV cache", f"{need:,} bytes", f"{need - 1:,} bytes",
                          "smaller batch", "--max-seq")
    _free_bytes(monkeypatch, need)
    assert cli(capsys, "run", out, *RUN)[0] == 0
    monkeypatch.undo()  # the machine's own free memory
    assert cli(capsys, "run", out, *RUN)[0] == 0


@pytest.mark.parametrize("form", sorted(KV_COPIES))
def test_refused_kv_cache_leaves_the_model_usable(built, monkeypatch, form):
    import moe_compile

    model = moe_compile.load(built("qwen2_moe", form=form))
    one, three = (KV_COPIES[form] * model.manifest.kv_cache_bytes(rows) for rows in (1, 3))
    _free_bytes(monkeypatch, 0)
    with pytest.raises(RequestError, match="KV cache"):
        model.generate([[1, 2, 3]], max_new_tokens=2)
    assert model.backend.batch == 0 and model.backend.capacity == 0  # nothing to step into, nothing allocated
    monkeypatch.undo()
    expected = model.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids
    _free_bytes(monkeypatch, three - one - 1)  # growing to 3 rows frees the 1-row cache first
    with pytest.raises(RequestError, match="KV cache"):
        model.generate([[1, 2, 3]] * 3, max_new_tokens=2)
    assert model.backend.capacity == 1
    assert model.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids == expected  # the kept cache still serves
    _free_bytes(monkeypatch, three - one)
    assert [r.token_ids for r in model.generate([[1, 2, 3]] * 3, max_new_tokens=2)] == [expected] * 3


# --- the output directory ---------------------------------------------------------------------------------

def test_parent_that_is_a_file(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*cli(capsys, "build", checkpoint("qwen2_moe"), "-o", tmp_path / "file" / "out"),
                          "cannot write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent(checkpoint, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    assert_one_line_error(*cli(capsys, "build", checkpoint("qwen2_moe"), "-o", parent / "out"), "cannot write")


def test_out_dot_inside_a_build(build_copy, checkpoint, capsys, monkeypatch):
    before = sorted(p.name for p in build_copy.iterdir())
    monkeypatch.chdir(build_copy)
    assert_one_line_error(*cli(capsys, "build", checkpoint("qwen2_moe"), "-o", "."), "current directory")
    assert sorted(p.name for p in build_copy.iterdir()) == before


def test_staging_umask_exchange_and_sweep(tmp_path):
    from moe_compile.build_dir import staging

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    dead = tmp_path / ".out.building-999999999-dead"  # a pid no process has
    alive = tmp_path / f".out.building-{os.getppid()}-live"
    dead.mkdir(), alive.mkdir()
    previous = os.umask(0o027)
    try:
        with staging(out, 0) as tmp:
            (tmp / "manifest.json").write_text("new")
    finally:
        os.umask(previous)
    assert (out / "manifest.json").read_text() == "new"
    assert out.stat().st_mode & 0o777 == 0o750
    assert not dead.exists() and alive.exists()  # only a dead build's directory is swept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, ".out.lock", "out"])


def test_failed_block_keeps_out(tmp_path):
    from moe_compile.build_dir import staging

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staging(out, 0) as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError("stage failed")
    assert (out / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if "building" in p.name] == []


def test_two_builds_take_turns(tmp_path):
    from moe_compile.build_dir import staging

    out, order = tmp_path / "out", []

    def build(name, hold):
        with staging(out, 0) as tmp:
            order.append(f"{name} start")
            time.sleep(hold)
            (tmp / "manifest.json").write_text(name)
            order.append(f"{name} end")

    first = threading.Thread(target=build, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    build("b", 0)
    first.join()
    assert order == ["a start", "a end", "b start", "b end"]
    assert (out / "manifest.json").read_text() == "b"


# --- the CLI's net under the known failures -----------------------------------------------------------------

NET_LINE = "(MOE_COMPILE_DEBUG=1 shows the traceback)"


def _raise(exc):
    def fail(*_args, **_kwargs):
        raise exc
    return fail


def test_unexpected_error_is_one_line(capsys, monkeypatch):
    from moe_compile import cli as cli_module

    monkeypatch.delenv("MOE_COMPILE_DEBUG", raising=False)
    monkeypatch.setitem(cli_module.COMMANDS, "families", _raise(RuntimeError("went wrong\nsecond line")))
    rc, err = cli(capsys, "families")
    assert rc == 1 and err == f"error: internal error in families: RuntimeError: went wrong {NET_LINE}", err
    monkeypatch.setitem(cli_module.COMMANDS, "families", _raise(MemoryError()))
    rc, err = cli(capsys, "families")
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: out of memory in families"), err
    monkeypatch.setenv("MOE_COMPILE_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(MemoryError):
        main(["families"])


def test_unexpected_error_names_the_build_stage(checkpoint, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("MOE_COMPILE_DEBUG", raising=False)  # moe_compile.build is also the function: the module
    monkeypatch.setattr(importlib.import_module("moe_compile.build"), "capture", _raise(ValueError("odd shape")))
    rc, err = cli(capsys, "build", checkpoint("qwen2_moe"), "-o", tmp_path / "out", "--backend", "onnx")
    assert rc == 1 and err.splitlines()[-1] == f"error: internal error in capture: ValueError: odd shape {NET_LINE}", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # no OUT, no staging directory


# --- signals, pipes, start-up (subprocesses) --------------------------------------------------------------

def _popen(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "moe_compile.cli", *map(str, args)], stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_during_build_leaves_nothing(built, checkpoint, tmp_path, signum):
    out = tmp_path / "out"
    shutil.copytree(built("qwen2_moe", "auto"), out)
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    proc = _popen("build", checkpoint("qwen2_moe"), "-o", out, "--max-seq", "32", "--backend", "onnx")
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.building-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert not list(tmp_path.glob(".out.building-*"))
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before


def test_broken_pipe_is_quiet(built):
    proc = _popen("run", built("qwen2_moe", "auto"), "--input-ids", "1,2,3", "--max-new-tokens", "100",
                  stdout=subprocess.PIPE)
    proc.stdout.close()  # `| head` that has read enough
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode != 0


def test_ctrl_c_at_start_up(tmp_path):
    proc = _popen("inspect", tmp_path)
    time.sleep(0.5)  # importing torch and transformers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err, err


# --- capture never runs transformers' experts implementations ---------------------------------------------

def _odd_width_config(name: str) -> dict:
    from moe_compile.models import FAMILIES

    config = dict(FAMILIES[name].tiny_config)
    key = "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"
    return {**config, key: 18}  # 72-byte expert rows: not a multiple of 16 bytes


def _expert_families() -> list[str]:
    from moe_compile.models import FAMILIES, Routing

    return sorted(name for name, spec in FAMILIES.items() if spec.routing is not Routing.NONE)


@pytest.mark.parametrize("family", _expert_families())
def test_kv_shapes_with_odd_expert_widths(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_compile.capture.decoder_step import kv_shapes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**_odd_width_config(family))).eval()
    assert len(kv_shapes(model)) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", _expert_families())
def test_odd_width_experts_build_and_match_transformers(tmp_path, capsys, family):
    """Every family with experts, at an expert width of 18 (72-byte rows; GLM-4-MoE's case in issue 14): the
    build's default form, then `verify`'s greedy tokens against transformers."""
    from moe_compile.models.embedded import write_checkpoint

    ckpt = tmp_path / "ckpt"
    write_checkpoint(_odd_width_config(family), ckpt)
    out = tmp_path / "out"
    rc, err = cli(capsys, "build", ckpt, "-o", out, "--max-seq", "32", "--backend", "onnx", "--no-torch-program")
    assert rc == 0, err
    assert main(["verify", str(out), "--new-tokens", "8"]) == 0
    assert "PASS" in capsys.readouterr().out
