"""`moe-compile bench` on the CPU provider: the grid runs, the record is complete (with each row's decode
floor), bad requests are one-line errors; the floor's byte count against the tiny config's arithmetic."""

from __future__ import annotations

import json

import pytest

from moe_compile.cli import main
from moe_compile.export.manifest import read_manifest
from moe_compile.models import FAMILIES
from moe_compile.runtime.benchmark import bench
from moe_compile.runtime.floor import distinct_experts, step_bytes


def test_bench_json_record(built, capsys):
    out = built("qwen2_moe", "auto")
    args = ["bench", str(out), "--batch", "1,3", "--prompt-len", "4,9", "--new-tokens", "5", "--repeats", "2", "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["backend"], record["device"], record["dtype"], record["lowering"]) == ("ort", "cpu", "fp32", "auto")
    assert [(r["batch"], r["prompt_len"]) for r in record["rows"]] == [(1, 4), (1, 9), (3, 4), (3, 9)]
    for row in record["rows"]:
        assert row["kv_length"] == row["prompt_len"] + 5  # every decode step ran through the cache
        assert len(row["prefill_ms_all"]) == 2 and row["prefill_ms"] > 0
        assert row["decode_tokens_per_s"] > 0 and row["decode_ms_per_step"] > 0
        assert row["peak_device_mb"] is None and row["peak_host_mb"] > 0
        assert row["floor_tokens_per_s"] == pytest.approx(row["batch"] / row["floor_ms"] * 1e3)
        assert row["percent_of_floor"] == pytest.approx(100 * row["decode_tokens_per_s"] / row["floor_tokens_per_s"])
    assert record["copy_bandwidth_GBps"] > 0
    floors = {(r["batch"], r["prompt_len"]): r["floor_bytes"] for r in record["rows"]}
    # a longer cache and more rows (more embedding rows, distinct experts, caches) read more
    assert floors[1, 4] < floors[1, 9] < floors[3, 9] and floors[1, 4] < floors[3, 4] < 3 * floors[1, 4]


def test_bench_table_on_the_torch_backend(built, capsys):
    out = built("qwen2_moe", "auto")
    record = bench(out, "torch", [2], [3], new_tokens=2, repeats=1)
    assert record["rows"][0]["kv_length"] == 5
    assert main(["bench", str(out), "--prompt-len", "6", "--new-tokens", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("on ort [cpu]") and lines[1].startswith("floor: ") and "% floor" in lines[2]
    assert lines[3].split()[:3] == ["1", "6", "2"] and lines[3].split()[8].endswith("%")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--batch", "5", "--prompt-len", "4"], ["max_batch 4"]),
        (["--prompt-len", "100", "--new-tokens", "29"], ["max_seq 128"]),
        (["--batch", "1,x"], ["--batch", "integers"]),
        (["--prompt-len", "4", "--new-tokens", "0"], [">= 1"]),
    ],
    ids=["batch-over-max", "over-max-seq", "bad-list", "zero-new-tokens"],
)
def test_bad_bench_requests(built, capsys, args, words):
    out = built("qwen2_moe", "auto")
    assert main(["bench", str(out), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], err[0]


def test_bench_of_a_missing_build(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nothing")]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err


def _tiny_qwen2_moe_step_bytes(batch: int, past: int) -> float:
    """The tiny Qwen2-MoE's decode-step reads, from its config (fp32): attention with q/k/v biases, two norms
    per layer, a router + sigmoid-gated shared expert + k selected experts per MoE layer, a dense MLP in
    the `mlp_only_layers`, the final norm, lm_head, `batch` embedding rows, and the KV cache."""
    c = FAMILIES["qwen2_moe"].tiny_config
    h, e, k, layers = c["hidden_size"], c["num_experts"], c["num_experts_per_tok"], c["num_hidden_layers"]
    dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * dim
    attention = 2 * h * h + 2 * h * kv + h + 2 * kv
    expert = 3 * h * c["moe_intermediate_size"]
    moe = e * h + 3 * h * c["shared_expert_intermediate_size"] + h + expert * distinct_experts(e, k, batch)
    dense = 3 * h * c["intermediate_size"]
    mlps = sum(dense if i in c["mlp_only_layers"] else moe for i in range(layers))
    weights = layers * (attention + 2 * h) + mlps + h + c["vocab_size"] * h + batch * h
    return 4 * (weights + batch * past * layers * 2 * kv)


@pytest.mark.parametrize("batch,past", [(1, 0), (1, 100), (3, 50)])
def test_floor_bytes_match_the_config(built, batch, past):
    """Counted from the ONNX, within 1% of the config's arithmetic (the exporter merges identical constants,
    e.g. the all-ones norm weights of a random checkpoint, and adds shape constants)."""
    out = built("qwen2_moe", "auto")
    reads = step_bytes(out, read_manifest(out))
    assert [(layer.experts, layer.top_k) for layer in reads.experts] == [(8, 2), (8, 2)]
    assert reads.total(batch, past) == pytest.approx(_tiny_qwen2_moe_step_bytes(batch, past), rel=1e-2)


@pytest.mark.parametrize("form", ["portable", "ort"])
def test_floor_bytes_of_moe_nodes(built, form):
    """com.microsoft:MoE reads its experts through the gate/up interleave (portable `fused`) or folded weight
    layouts (the ort form): the same experts, bytes and top-k as auto, and the same step total."""
    auto, fused = built("qwen2_moe", "auto"), built("qwen2_moe", "fused", form=form)
    a, f = step_bytes(auto, read_manifest(auto)), step_bytes(fused, read_manifest(fused))
    assert [(layer.experts, layer.top_k, layer.bytes) for layer in f.experts] == [
        (layer.experts, layer.top_k, layer.bytes) for layer in a.experts]
    assert f.total(1, 10) == pytest.approx(a.total(1, 10), rel=1e-2)


def test_floor_bytes_of_quantized_experts(built):
    """com.microsoft:QMoE reads packed codes and block scales: the same routed experts and top-k as the
    unquantized build, each layer's bytes those of its quantized tensors (4-bit codes + fp32 scales per
    block of 32: 0.625 bytes a weight against 4), so the step reads far less."""
    plain, quantized = built("qwen2_moe", form="ort"), built("qwen2_moe", form="ort", quantize="int4")
    p, q = step_bytes(plain, read_manifest(plain)), step_bytes(quantized, read_manifest(quantized))
    assert [(layer.experts, layer.top_k) for layer in q.experts] == [(layer.experts, layer.top_k) for layer in p.experts]
    for fp, packed in zip(p.experts, q.experts):
        assert packed.bytes == pytest.approx(fp.bytes * 0.625 / 4, rel=0.02)
    assert q.total(1, 10) < p.total(1, 10) / 2


def test_bench_of_an_ort_form_build(built):
    """The ort form's greedy steps (ArgMax in the graph) through the same grid."""
    out = built("qwen2_moe", form="ort")
    record = bench(out, "ort", [1, 2], [5], new_tokens=3, repeats=1)
    assert [(r["batch"], r["kv_length"]) for r in record["rows"]] == [(1, 8), (2, 8)]
    assert all(r["percent_of_floor"] > 0 for r in record["rows"])


def test_distinct_experts_under_uniform_routing():
    assert distinct_experts(60, 4, 1) == pytest.approx(4)
    assert distinct_experts(60, 4, 8) == pytest.approx(60 * (1 - (56 / 60) ** 8))  # 25.8 of 60
    assert 59.9 < distinct_experts(60, 4, 256) <= 60
