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


def test_block_negative_parts_splits_kernel_and_bias(benchmarks, tmp_path, capsys):
    import block_negative_parts
    import keras
    import numpy as np

    import tf_layersparse as ls

    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(2, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
    base = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    model = ls.apply_layer_sparsity(base, 0.1, nonnegative_inputs=True)
    model.get_layer("conv").set_weights([np.full((3, 3, 1, 2), -1.0, "float32")])
    model.get_layer("bn").set_weights([np.ones(2, "float32"), np.array([0.0, -3.0], "float32"),
                                       np.zeros(2, "float32"), np.ones(2, "float32")])
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert block_negative_parts.main([path]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| conv")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    scale = 1 / np.sqrt(1 + 1e-3)  # gamma / sqrt(var + eps)
    assert cells[1] == "bn"
    assert float(cells[2]) == pytest.approx(np.sqrt(18) * scale, rel=1e-3)
    assert float(cells[3]) == pytest.approx(3.0, rel=1e-3)


@pytest.mark.tf_only  # the benchmark is backend-agnostic; one backend keeps CI short
def test_depth_target_quick_runs_and_resumes(benchmarks, tmp_path, capsys):
    import depth_target

    out = str(tmp_path / "runs")
    assert depth_target.main(["blocks", "--quick", "--out", out]) == 0
    first = capsys.readouterr().out
    rows = [line for line in first.splitlines() if line.startswith("| sgd | target 1")]
    assert len(rows) == 1
    header = next(line for line in first.splitlines() if line.startswith("| optimizer |"))
    column = [c.strip() for c in header.strip("|").split("|")].index("fold max rel. error")
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[column]) <= 1e-5
    # a second call finds every run in runs.jsonl and trains nothing
    assert depth_target.main(["blocks", "--quick", "--out", out]) == 0
    second = capsys.readouterr().out
    assert "# {" not in second and rows[0] in second
