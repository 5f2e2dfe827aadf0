"""The benchmarks' quick modes run end to end (their figures come from full runs)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmarks():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    yield
    sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_block_formulations_quick_folds_and_refits(benchmarks, capsys):
    import block_formulations

    args = block_formulations._parse(["--quick", "--steps", "raw", "--refit-epochs", "1"])
    assert block_formulations.main(args) == 0  # every fold within 1e-5
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| raw |")]
    assert len(rows) == 1
    refit_accuracy = float(rows[0].strip(" |").split("|")[-1])
    assert 0.0 <= refit_accuracy <= 100.0
