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
