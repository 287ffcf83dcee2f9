"""`moe-compile bench` on the CPU provider: the grid runs, the record is complete, bad requests are
one-line errors."""

from __future__ import annotations

import json

import pytest

from moe_compile.cli import main
from moe_compile.runtime.benchmark import bench


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


def test_bench_table_on_the_torch_backend(built, capsys):
    out = built("qwen2_moe", "auto")
    record = bench(out, "torch", [2], [3], new_tokens=2, repeats=1)
    assert record["rows"][0]["kv_length"] == 5
    assert main(["bench", str(out), "--prompt-len", "6", "--new-tokens", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("on ort [cpu]") and lines[2].split()[:3] == ["1", "6", "2"]


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
