"""The ort form's runtime (runtime/ort_inplace.py), on a real ort-form build of a tiny Qwen2-MoE (tokens
checked against transformers) and on a one-layer model written with onnx.helper to the form's contract:
Gather embedding -> packed QKV MatMul -> GroupQueryAttention (shared KV buffer, rotary inside) -> the
last real position -> LM head -> logits, next_token (ArgMax), top_logits/top_ids (TopK), checked against
a numpy reference of itself. Both prove right padding, the decode mask and the in-place cache correct,
not only self-consistent; the small one also runs the form's limits and the CLI in a second."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

from moe_compile.errors import RequestError
from moe_compile.export.manifest import ONNX_FILE, Manifest, io_signature, read_manifest
from moe_compile.runtime import BACKENDS, Chooser, Sampling, generate
from moe_compile.runtime.generate import decode_one, prefill
from moe_compile.runtime.ort_backend import MissingKernelError
from moe_compile.runtime.cuda_step import StepGraph
from moe_compile.runtime.ort_inplace import OrtCudaInplaceBackend, OrtInplaceBackend

VOCAB, HEADS, KV_HEADS, DIM, MAX_SEQ, CANDIDATES = 64, 4, 2, 16, 32, 8
needs_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="needs onnxruntime-gpu and a CUDA device (the GPU machine)")


def weights():
    rng = np.random.default_rng(0)
    hidden = HEADS * DIM
    inv = 1.0 / 10000 ** (np.arange(0, DIM, 2) / DIM)
    angles = np.outer(np.arange(MAX_SEQ), inv)
    return {"embed": rng.normal(size=(VOCAB, hidden)), "wqkv": rng.normal(size=(hidden, (HEADS + 2 * KV_HEADS) * DIM)) / 4,
            "lm_head": rng.normal(size=(hidden, VOCAB)), "cos": np.cos(angles), "sin": np.sin(angles)}


def write_model(out, dtype: str = "fp32"):
    """The one-layer model in fp32 or fp16 (ONNX Runtime's CUDA GroupQueryAttention has no fp32 kernel).
    Shape arithmetic only feeds inputs that CUDA kernels read on the host, as in real builds, so
    the CUDA provider needs no copies and can capture the whole step as a graph."""
    np_type, onnx_type = {"fp32": (np.float32, TP.FLOAT), "fp16": (np.float16, TP.FLOAT16)}[dtype]
    w = {k: numpy_helper.from_array(v.astype(np_type), k) for k, v in weights().items()}
    consts = [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in [("one", [1]), ("one_s", 1), ("zero", [0]), ("last_axes", [1, 2]), ("hidden_size", [HEADS * DIM])]]
    nodes = [
        h.make_node("Gather", ["embed", "input_ids"], ["x"]),
        h.make_node("MatMul", ["x", "wqkv"], ["qkv"]),
        h.make_node("ReduceSum", ["attention_mask", "one"], ["lengths"], keepdims=0),
        h.make_node("Sub", ["lengths", "one"], ["seqlens64"]),
        h.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TP.INT32),
        h.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        h.make_node("Gather", ["mask_shape", "one_s"], ["total64"], axis=0),
        h.make_node("Cast", ["total64"], ["total"], to=TP.INT32),
        h.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k",
                                            "total", "cos", "sin"], ["attn", "present.0.key", "present.0.value"],
                    domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, scale=DIM**-0.5),
        # the last real position of each row, min(seqlens_k, S - 1), gathered: [B, S, H] -> [B, H]. S - 1 is
        # computed on the device: from Shape it would be a host value, and a Memcpy rules out CUDA graphs.
        h.make_node("Mul", ["input_ids", "zero"], ["zeros"]),
        h.make_node("Add", ["zeros", "one"], ["ones"]),
        h.make_node("ReduceSum", ["ones", "one"], ["new"], keepdims=0),
        h.make_node("Sub", ["new", "one"], ["new_1"]),
        h.make_node("Min", ["seqlens64", "new_1"], ["last"]),
        h.make_node("Unsqueeze", ["last", "last_axes"], ["last_3d"]),
        h.make_node("Shape", ["input_ids"], ["ids_shape"]),
        h.make_node("Slice", ["ids_shape", "zero", "one"], ["batch"]),
        h.make_node("Concat", ["batch", "one", "hidden_size"], ["pick_shape"], axis=0),
        h.make_node("Expand", ["last_3d", "pick_shape"], ["pick"]),
        h.make_node("GatherElements", ["attn", "pick"], ["hidden_3d"], axis=1),
        h.make_node("Squeeze", ["hidden_3d", "one"], ["hidden"]),
        h.make_node("MatMul", ["hidden", "lm_head"], ["logits_t"]),
        h.make_node("Cast", ["logits_t"], ["logits"], to=TP.FLOAT),
        h.make_node("ArgMax", ["logits"], ["next_token"], axis=1, keepdims=0),
        h.make_node("TopK", ["logits", "k"], ["top_logits", "top_ids"], axis=-1),
    ]
    kv = ["batch_size", KV_HEADS, MAX_SEQ, DIM]
    inputs = [h.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
              h.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
              h.make_tensor_value_info("past_key_values.0.key", onnx_type, kv),
              h.make_tensor_value_info("past_key_values.0.value", onnx_type, kv)]
    outputs = [h.make_tensor_value_info("logits", TP.FLOAT, ["batch_size", VOCAB]),
               h.make_tensor_value_info("next_token", TP.INT64, ["batch_size"]),
               h.make_tensor_value_info("top_logits", TP.FLOAT, ["batch_size", CANDIDATES]),
               h.make_tensor_value_info("top_ids", TP.INT64, ["batch_size", CANDIDATES]),
               h.make_tensor_value_info("present.0.key", onnx_type, kv),
               h.make_tensor_value_info("present.0.value", onnx_type, kv)]
    k = numpy_helper.from_array(np.array([CANDIDATES], np.int64), "k")
    graph = h.make_graph(nodes, "inplace", inputs, outputs, initializer=[*w.values(), *consts, k])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    onnx.save(model, str(out / ONNX_FILE))
    ins, outs = io_signature(out / ONNX_FILE)
    Manifest(family={"model_type": "handmade"}, source="handmade", dtype=dtype, lowering="gather", auto_threshold=0,
             layers={}, max_batch=4, max_seq=MAX_SEQ, vocab_size=VOCAB, eos_token_ids=[], pad_token_id=0,
             kv={"layout": "shared_buffer", "num_layers": 1, "layers": [[[KV_HEADS, DIM], [KV_HEADS, DIM]]]},
             inputs=ins, outputs=outs, opset=18, ir_version=10, files=[ONNX_FILE], tokenizer=False, tool_versions={},
             form="ort", sampling_candidates=CANDIDATES).write(out)
    return out


def reference_logits(tokens: list[int]) -> np.ndarray:
    """The same model in numpy on one unpadded sequence: logits [L, V] of every position."""
    w, n = weights(), len(tokens)
    qkv = w["embed"][tokens] @ w["wqkv"]
    q = qkv[:, : HEADS * DIM].reshape(n, HEADS, DIM)
    k = qkv[:, HEADS * DIM : (HEADS + KV_HEADS) * DIM].reshape(n, KV_HEADS, DIM)
    v = qkv[:, (HEADS + KV_HEADS) * DIM :].reshape(n, KV_HEADS, DIM)
    cos, sin = (np.concatenate([w[t][:n]] * 2, -1)[:, None] for t in ("cos", "sin"))

    def rotate(x):
        return x * cos + np.concatenate([-x[..., DIM // 2 :], x[..., : DIM // 2]], -1) * sin

    q, k = rotate(q), np.repeat(rotate(k), HEADS // KV_HEADS, axis=1)
    v = np.repeat(v, HEADS // KV_HEADS, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * DIM**-0.5 + np.triu(np.full((n, n), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(n, HEADS * DIM) @ w["lm_head"]


def reference_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(reference_logits(tokens)[-1].argmax()))
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("inplace"))


PROMPTS = [[5, 9, 3, 17, 22], [40, 2], [7, 7, 1, 30, 12, 11, 60, 4, 19]]


@pytest.fixture(params=["handmade", "qwen2_moe"])
def backend(request, model_dir, built):
    """The in-place backend on the hand-written model, and on a real ort-form build of a tiny Qwen2-MoE."""
    out = model_dir if request.param == "handmade" else built(request.param, form="ort")
    backend = BACKENDS["ort"](out, read_manifest(out)).activate()
    backend.variant = request.param
    return backend


@pytest.fixture
def greedy_reference(reference_tokens):
    """Each prompt's greedy continuation alone: numpy for the hand-written model, transformers for a build."""

    def make(backend, prompts, new_tokens):
        if backend.variant == "handmade":
            return [reference_greedy(p, new_tokens) for p in prompts]
        return reference_tokens(backend.variant, prompts, new_tokens)

    return make


def run(backend, prompts, new_tokens=8, **sampling):
    return generate(backend, prompts, new_tokens, Sampling(**sampling), eos_ids=[], pad_id=0)[0]


def test_the_manifest_form_picks_the_in_place_variant(model_dir):
    manifest = read_manifest(model_dir)
    assert type(BACKENDS["ort"](model_dir, manifest)) is OrtInplaceBackend
    assert type(BACKENDS["ort-cuda"](model_dir, manifest)) is OrtCudaInplaceBackend
    assert BACKENDS["ort-cuda"](model_dir, manifest).provider_options()["enable_cuda_graph"] == 1
    assert "enable_cuda_graph" not in BACKENDS["ort-cuda"](model_dir, manifest, cuda_graph=False).provider_options()
    with pytest.raises(MissingKernelError, match="no fp32 kernel"):  # the hand-written model is fp32
        BACKENDS["ort-cuda"](model_dir, manifest).activate()
    manifest.form = "portable"
    assert type(BACKENDS["ort"](model_dir, manifest)).__name__ == "OrtBackend"


def test_kv_buffers_and_decode_bindings_never_move(backend):
    chooser = Chooser(Sampling(), [[]] * 2, np.random.default_rng(0))
    tokens, mask = prefill(backend, PROMPTS[:2], 0, chooser)
    kv = [buffer.data_ptr() for buffer in backend.kv]
    decode = None
    for _ in range(10):
        tokens, mask = decode_one(backend, tokens, mask, chooser)
        decode = decode or backend.decodes[2]
        assert backend.decodes[2] is decode
        assert [b.data_ptr() for b in backend.kv] == kv
    assert {n: v.data_ptr() for n, v in decode.inputs.items()} == {n: v.data_ptr() for n, v in backend.decodes[2].inputs.items()}
    backend.reset(1)  # a smaller batch reuses the buffers
    assert [b.data_ptr() for b in backend.kv] == kv


def test_greedy_decode_copies_only_token_ids_to_the_host(backend, greedy_reference, monkeypatch):
    reads, copies = [], []
    read, copy_rows = backend._read, backend.memory.copy_rows
    monkeypatch.setattr(backend, "_read", lambda decode, name: reads.append(name) or read(decode, name))
    monkeypatch.setattr(backend.memory, "copy_rows", lambda dst, *a: copies.append(dst.nbytes) or copy_rows(dst, *a))
    assert run(backend, PROMPTS) == greedy_reference(backend, PROMPTS, 8)
    assert set(reads) == {"next_token"} and len(reads) == 8
    assert set(copies) == {len(PROMPTS) * 8}  # B int64 per step, nothing else


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=1), dict(temperature=0.7, top_k=5),
                                      dict(temperature=2.0, top_k="C"), dict(temperature=1.5, top_k=4, top_p=0.8)],
                         ids=["k1", "k5", "kC", "k4-p0.8"])
def test_sampling_from_the_candidates_equals_the_full_logits(backend, monkeypatch, sampling):
    if sampling["top_k"] == "C":
        sampling = dict(sampling, top_k=backend.manifest.sampling_candidates)
    reads = []
    read = backend._read
    monkeypatch.setattr(backend, "_read", lambda decode, name: reads.append(name) or read(decode, name))
    for seed in range(5):
        candidates = run(backend, PROMPTS, 10, seed=seed, **sampling)
        with monkeypatch.context() as m:
            m.setattr(Chooser, "reads", lambda self, c: "logits")
            assert run(backend, PROMPTS, 10, seed=seed, **sampling) == candidates
    assert {"top_logits", "top_ids", "logits"} == set(reads)  # both paths ran
    assert sum(name == "top_ids" for name in reads) == 5 * 10


def test_a_batch_gives_each_prompt_its_own_tokens(backend, greedy_reference):
    batched = run(backend, PROMPTS, 12)
    assert batched == [run(backend, [p], 12)[0] for p in PROMPTS] == greedy_reference(backend, PROMPTS, 12)


def test_every_position_and_the_limits_of_the_form(model_dir):
    backend = BACKENDS["ort"](model_dir, read_manifest(model_dir)).activate()
    prompt = PROMPTS[2]
    backend.reset(1)
    ids = np.array([prompt])
    logits = backend.step(ids, np.ones_like(ids), np.arange(len(prompt))[None])
    np.testing.assert_allclose(logits[0], reference_logits(prompt), rtol=1e-4, atol=1e-4)
    with pytest.raises(RequestError, match="empty cache, then one new token"):
        backend.step_last(ids[:, :2], np.ones((1, len(prompt) + 2)), np.zeros((1, 2)))
    backend.reset(2)
    with pytest.raises(RequestError, match="unpadded rows"):
        backend.step(np.ones((2, 3)), np.array([[0, 1, 1], [1, 1, 1]]), np.zeros((2, 3)))


def test_run_streams_the_tokens_with_and_without_cuda_graphs(model_dir, capsys):
    from moe_compile.cli import main

    expected = " ".join(map(str, reference_greedy(PROMPTS[0], 4)))
    for flags in ([], ["--no-cuda-graph"]):
        assert main(["run", str(model_dir), "--input-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "4", *flags]) == 0
        assert capsys.readouterr().out.strip() == expected


def test_a_subclass_made_elsewhere_stays_itself(model_dir):
    class Custom(BACKENDS["ort"]):
        pass

    assert type(Custom(model_dir, read_manifest(model_dir))) is Custom


@needs_cuda
def test_ort_cuda_graph_replays_give_the_uncaptured_tokens(tmp_path, monkeypatch):
    out = write_model(tmp_path, "fp16")
    graphs, plain = (BACKENDS["ort-cuda"](out, read_manifest(out), cuda_graph=g).activate() for g in (True, False))
    reads = []
    read = graphs._read
    monkeypatch.setattr(graphs, "_read", lambda decode, name: reads.append(name) or read(decode, name))
    kv = None
    for batch in (3, 1, 3, 2):  # batch sizes come back to their graphs
        assert run(graphs, PROMPTS[:batch], 12) == run(plain, PROMPTS[:batch], 12)
        kv = kv or [b.data_ptr() for b in graphs.kv]
        assert [b.data_ptr() for b in graphs.kv] == kv
    assert set(reads) == {"next_token"} and len(reads) == 4  # the prompts' tokens; decode steps' come pinned
    for sampling in (dict(temperature=1.0, top_k=4, seed=3), dict(temperature=0.8, seed=1), dict(repetition_penalty=1.3)):
        assert run(graphs, PROMPTS, 12, **sampling) == run(plain, PROMPTS, 12, **sampling)


@needs_cuda
def test_greedy_steps_launch_the_next_step_ahead_and_drop_it_when_not_taken(tmp_path, monkeypatch):
    """Greedy decode: one uncaptured warm-up per WARMUP, one capture, then each step launches the next one before
    it reads its own token, and the next call takes it. A finished row fed padding, a sampled step or a new prompt
    does not take it: the step runs again and the tokens stay those of the uncaptured backend."""
    out = write_model(tmp_path, "fp16")
    graphs, plain = (BACKENDS["ort-cuda"](out, read_manifest(out), cuda_graph=g).activate() for g in (True, False))
    launches = []
    launch = StepGraph.launch
    monkeypatch.setattr(StepGraph, "launch", lambda self, ids, lengths, run=None: launches.append(
        "warm" if run else "ahead" if ids is None else "step") or launch(self, ids, lengths, run))
    assert run(graphs, PROMPTS[:1], 12) == run(plain, PROMPTS[:1], 12)
    warm = OrtCudaInplaceBackend.WARMUP
    assert launches == ["warm"] * warm + ["step"] + ["ahead"] * (11 - warm)  # 11 decode steps; the last ahead unused
    launches.clear()
    assert run(graphs, PROMPTS[:1], 12) == run(plain, PROMPTS[:1], 12)  # the new prompt ran over the unused step
    assert launches == ["step"] + ["ahead"] * 10
    # a row that finishes is fed padding: the steps after it are launched again, with the same tokens as uncaptured
    full = run(plain, PROMPTS, 10)
    eos = full[1][3]
    finished = [generate(b, PROMPTS, 10, Sampling(), eos_ids=[eos], pad_id=0)[0] for b in (graphs, plain)]
    assert finished[0] == finished[1]
    assert len(finished[0][1]) <= 4
    # after greedy steps, a sampled step and a step that wants the logits: the unused step is run over, or taken
    picked, logits = [], []
    for backend in (graphs, plain):
        tokens, mask = prefill(backend, PROMPTS[:1], 0, Chooser())
        for _ in range(3):
            tokens, mask = decode_one(backend, tokens, mask, Chooser())
        sampling = Chooser(Sampling(temperature=1.0, top_k=4), [[]], np.random.default_rng(5))
        sampled, mask = decode_one(backend, tokens, mask, sampling)
        tokens, mask = decode_one(backend, sampled, mask, Chooser())
        logits.append(decode_one(backend, tokens, mask)[0])
        picked.append((sampled.tolist(), tokens.tolist()))
    assert picked[0] == picked[1]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_ort_cuda_graphs_on_a_real_build(built):
    out = built("qwen2_moe", dtype="fp16", form="ort")
    graphs, plain = (BACKENDS["ort-cuda"](out, read_manifest(out), cuda_graph=g).activate() for g in (True, False))
    for batch in (3, 1, 3):
        assert run(graphs, PROMPTS[:batch], 16) == run(plain, PROMPTS[:batch], 16)
