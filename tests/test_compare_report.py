"""benchmarks/compare_llamacpp.py's report: a ratio is the median of per-run ratios with its range,
and the doc is written only from enough runs (its numbers are benchmarks, not tests)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_llamacpp.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ratio_is_the_median_of_paired_runs_with_its_range(compare):
    # run i of each engine ran back to back: ratios 2.0, 0.5, 1.5 -> median 1.5 (the ratio of the
    # medians would be 10 / 10 = 1.0)
    res = {"upg": [{"decode_tps": 20.0}, {"decode_tps": 5.0}, {"decode_tps": 10.0}],
           "llamacpp": [{"decode_tps": 10.0}, {"decode_tps": 10.0}, {"decode_tps": 20 / 3}]}
    assert compare.run_ratios(res, "decode_tps") == pytest.approx([2.0, 0.5, 1.5])
    assert compare._ratio_cell(res, "decode_tps") == "**1.50** (0.50-2.00)"
    one = {"upg": [{"decode_tps": 3.0}], "llamacpp": [{"decode_tps": 2.0}]}
    assert compare._ratio_cell(one, "decode_tps") == "**1.50**"


@pytest.mark.parametrize("models", ["smollm2:2", "phi-4-q4:1"])
def test_doc_needs_three_runs_per_model(tmp_path, models):
    p = subprocess.run([sys.executable, str(SCRIPT), "--peer-python", sys.executable, "--models", models,
                        "--doc", str(tmp_path / "B.md"), "--work-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "at least 3 runs" in p.stderr
    assert not (tmp_path / "B.md").exists()
