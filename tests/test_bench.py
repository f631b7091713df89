"""`upg bench` refuses bad input with one clear line (its numbers are benchmarks, not tests)."""
from __future__ import annotations

import pytest

from upg_backend import cli


@pytest.mark.parametrize("args, message", [
    (["missing.upg"], "cannot open missing.upg"),
    (["small", "--type", "q5"], "unknown weight type 'q5'"),
    (["small", "--runs", "0"], "runs must be at least 1"),
    (["small", "--gen-tokens", "0"], "gen must be at least 1"),
    (["small", "--threads", "-1"], "threads must be 0"),
])
def test_bad_arguments(args, message, capsys):
    assert cli.main(["bench", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parallel_refuses_a_count_below_one(capsys):
    assert cli.main(["bench", "small", "--parallel", "4", "0"]) == 1
    err = capsys.readouterr().err
    assert "parallel stream counts must be at least 1" in err and "Traceback" not in err


def test_parallel_refuses_an_unknown_kernel():
    from upg_backend.bench import run_parallel_bench

    with pytest.raises(ValueError, match="generated must be 'matvec' or 'matmul'"):
        run_parallel_bench("small", [2], generated="mat-vec")


def test_parallel_streams_on_the_cpu(tmp_path, capsys):
    """`upg bench FILE --parallel 3`: rows for one stream (the reference) and three, each stream's
    tokens counted once (aggregate = streams x per stream), one stream's ratio 1, the weights' GB/s
    of each step beside the read probe."""
    from conftest import make_hf_checkpoint
    from upg_backend.convert import convert_hf

    src = make_hf_checkpoint(tmp_path / "hf", "Phi3ForCausalLM", seed=1, hidden_size=64, intermediate_size=128,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=96)
    path = tmp_path / "m.upg"
    convert_hf(src, path, type="q4", block=32, progress=False)
    assert cli.main(["bench", str(path), "--backend", "cpu", "--threads", "1", "--parallel", "3", "--prompt-tokens", "5",
                     "--gen-tokens", "4", "--runs", "1", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "cpu" and r["type"] == "q4" and [row["streams"] for row in r["rows"]] == [1, 3]
    per_step = []
    for row in r["rows"]:
        assert row["aggregate_tps"] > 0 and abs(row["aggregate_tps"] - row["streams"] * row["per_stream_tps"]) < 1e-6 * row["aggregate_tps"]
        assert 0 <= row["host_ms"] < row["step_ms"]
        per_step.append(row["weights_gbps"] * 1e9 * row["step_ms"] / 1e3)
    # a step reads the weights once, whatever its streams: every matrix, but one row of the embedding
    from upg_backend.format import UPGFile

    tensors = UPGFile(path).tensors
    total = sum(t.nbytes for t in tensors.values())
    assert abs(per_step[1] - per_step[0]) < 1e-6 * per_step[0]
    assert 0.9 * (total - tensors["model.embed_tokens.weight"].nbytes) < per_step[0] < total
    assert r["rows"][0]["vs_one_stream"] == 1.0
    assert r["machine_gbps"] > 0  # the host's read probe of the same run


def test_sampled_decode_on_the_cpu(tmp_path, capsys):
    """`upg bench FILE --sampled`: the sampled decode's two rates, beside the greedy one."""
    from conftest import make_hf_checkpoint
    from upg_backend.convert import convert_hf

    src = make_hf_checkpoint(tmp_path / "hf", "Phi3ForCausalLM", seed=1, hidden_size=64, intermediate_size=128,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=96)
    path = tmp_path / "m.upg"
    convert_hf(src, path, type="q4", block=32, progress=False)
    args = ["bench", str(path), "--backend", "cpu", "--threads", "1", "--prompt-tokens", "5", "--gen-tokens", "4",
            "--runs", "1"]
    assert cli.main([*args, "--json", "--sampled"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["decode_tps"] > 0 and r["sampled_tps"] > 0 and r["sampled_host_tps"] > 0
    assert cli.main([*args, "--sampled"]) == 0 and "sampled decode" in capsys.readouterr().out
