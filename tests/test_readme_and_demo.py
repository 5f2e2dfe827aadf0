import os
import re

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse import demo
from tf_layersparse.simulation import relu_mlp, simulate

from helpers import tensorflow_pass_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_readme_example(heading):
    """Run the first Python block after `heading` in README.md; its names."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, f"README: {heading}", "exec"), namespace)
    return namespace


def test_readme_quickstart_runs_as_written():
    namespace = _run_readme_example("## Quickstart")
    assert namespace["report"].max_relative_error <= 1e-5
    assert isinstance(namespace["small"], keras.Model)


@pytest.mark.backend_independent
def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    command = re.search(r"(python -m pytest[^\n`#]*)", readme).group(1).strip()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert command in f.read()


@tensorflow_pass_only  # the README examples below train on every backend
def test_demo_quick_mode_prints_the_table(capsys):
    assert demo.main(["--quick", "--hidden-layers", "4"]) == 0
    out = capsys.readouterr().out
    for label in ("LS", "SLS folded", "FLS (refit)", "test mse", "parameters"):
        assert label in out


@tensorflow_pass_only  # 2,000 SGD steps; the README examples train on every backend
def test_paper_setting_end_to_end():
    """Issue acceptance: l-1 = 10, s_W = 0.1, SGD lr 1e-2, batch 10, 200 epochs."""
    data = simulate(10, 0.1, seed=0)
    model = ls.apply_layer_sparsity(relu_mlp(2, 10, 5, seed=0), 0.2)
    model.compile(keras.optimizers.SGD(1e-2), "mse",
                  steps_per_execution=1 if keras.backend.backend() == "torch" else 10)
    tracker = ls.ActiveLayers()
    model.fit(data.x_train, data.y_train, batch_size=10, epochs=200, verbose=0,
              callbacks=[tracker])
    counts = tracker.history["active_layers"]
    assert counts[-1] < counts[0]
    inactive = [l for l in ls.regularized_layers(model)
                if ls.negative_part_norms(model)[l.name] == 0.0]
    assert inactive
    for layer in inactive:
        assert np.min(keras.ops.convert_to_numpy(layer.kernel)) >= 0
        assert np.min(keras.ops.convert_to_numpy(layer.bias)) >= 0
    folded, report = ls.fold(model, verify=data.x_test, tolerance=1e-5,
                             return_report=True)
    assert report.after.depth == report.before.depth - len(inactive)
    assert report.max_relative_error <= 1e-5
    refitted, history = ls.refit(model, data.x_train, data.y_train, batch_size=10,
                                 epochs=20, verbose=0, seed=0)
    assert ls.model_cost(refitted).depth == report.after.depth
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_readme_batchnorm_example_runs_as_written():
    namespace = _run_readme_example("### BatchNormalization blocks")
    report = namespace["report"]
    assert report.max_relative_error <= 1e-5
    assert report.after.depth < report.before.depth  # some block switched off and merged
    assert isinstance(namespace["small"], keras.Model)


def test_readme_depth_target_example_runs_as_written():
    namespace = _run_readme_example("### Ask for a depth, not a strength")
    progress = namespace["callback"].progress
    assert progress.reached and progress.inactive == 3
    model, folded = namespace["model"], namespace["folded"]
    assert ls.model_cost(folded).depth == ls.model_cost(model).depth - 3


def test_readme_resume_example_holds_as_an_uninterrupted_run_would(tmp_path):
    namespace = _run_readme_example("### Interrupting and resuming a target run")
    progress = namespace["callback"].progress
    assert progress.reached and len(progress.holds) == 3
    assert progress.begin_step < 3 * 16  # the warm-up ended before the interruption
