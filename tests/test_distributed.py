"""Two local processes train one penalised MLP and end in agreement.

The workers (tests/distributed_worker.py) each see a different half of
every global batch, so identical weights on both mean the gradients were
reduced across processes; identical held layers and multipliers mean the
depth target's host-side decisions were taken alike.

Each backend's test runs once, in the suite's pass with that
KERAS_BACKEND: the workers set their own backend, so running them in the
other two passes would only repeat the same subprocesses.
"""

import importlib.util
import json
import os
import sys

import keras
import numpy as np
import pytest

from distributed_worker import probe_input
from multiprocess import WorkerFailure, free_port, run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
LAYERS = 8  # input, first, hidden0..hidden4, out
PENALISED = 5
TIMEOUT = 300


def _once_on(backend):
    if importlib.util.find_spec(backend) is None:
        return pytest.mark.skip(reason=f"{backend} is not installed")
    return pytest.mark.skipif(
        keras.backend.backend() != backend,
        reason=f"runs once, in the suite's KERAS_BACKEND={backend} pass (the workers "
               f"set their own backend)")


def _launch(mode, out, target=0, world=2):
    port = free_port()
    commands = [[sys.executable, WORKER, mode, "--rank", str(rank), "--world", str(world),
                 "--port", str(port), "--out", str(out), "--target", str(target)]
                for rank in range(world)]
    try:
        return run_workers(commands, timeout=TIMEOUT, cwd=ROOT)
    except WorkerFailure as failure:
        pytest.fail(str(failure), pytrace=False)


def _results(out, world=2):
    summaries, arrays = [], []
    for rank in range(world):
        with open(out / f"rank{rank}.json") as f:
            summaries.append(json.load(f))
        with np.load(out / f"rank{rank}.npz") as data:
            arrays.append({name: data[name] for name in data.files})
    return summaries, arrays


def _assert_processes_agree(out, target):
    (first, second), (weights0, weights1) = _results(out)
    assert weights0.keys() == weights1.keys()
    for name in weights0:  # the weights, then the folded model's outputs
        np.testing.assert_array_equal(weights0[name], weights1[name], err_msg=name)
    assert first == second
    if target:
        assert first["reached"] and len(first["held"]) == target
        # the multiplier grew while the target was short: a divergence would show
        assert len(set(first["multipliers"])) > 1
    saved = keras.saving.load_model(out / "folded.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(saved(probe_input())),
                               weights0["folded"], rtol=1e-6, atol=1e-6)
    # fold removed exactly the penalised layers that ended inactive
    assert len(first["fold_layers"]) == LAYERS - (PENALISED - first["active_layers"][-1])
    assert not set(first["held"] or []) & set(first["fold_layers"])


@_once_on("jax")
@pytest.mark.parametrize("target", [0, 2])
def test_two_jax_processes_agree(tmp_path, target):
    _launch("jax", tmp_path, target)
    _assert_processes_agree(tmp_path, target)


@_once_on("torch")
@pytest.mark.parametrize("target", [0, 2])
def test_two_torch_processes_under_ddp_agree(tmp_path, target):
    _launch("torch", tmp_path, target)
    _assert_processes_agree(tmp_path, target)


@_once_on("torch")
def test_keras_fit_does_not_go_through_ddp(tmp_path):
    """Keras' torch `fit` calls the model, not its DDP wrapper, so DDP
    averages nothing: one step on different data leaves the processes with
    different weights. Should this fail, `fit` now synchronises under DDP
    and the torch recipe in README.md can use it."""
    _launch("probe-fit", tmp_path)
    weights = [np.load(tmp_path / f"rank{rank}.npz")["arr_0"] for rank in range(2)]
    assert not np.allclose(weights[0], weights[1])


@_once_on("tensorflow")
def test_two_tensorflow_workers_agree(tmp_path):
    ports = [free_port(), free_port()]
    hosts = [f"127.0.0.1:{port}" for port in ports]
    envs = [dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": rank}}))
        for rank in range(2)]
    commands = [[sys.executable, WORKER, "tensorflow", "--rank", str(rank), "--world", "2",
                 "--out", str(tmp_path), "--target", "2"] for rank in range(2)]
    try:
        run_workers(commands, env=envs, timeout=TIMEOUT, cwd=ROOT)
    except WorkerFailure as failure:
        pytest.fail(str(failure), pytrace=False)
    with open(tmp_path / "rank0.json") as f:
        summary = json.load(f)
    if "plain_fit_fails" in summary:
        pytest.skip("Keras' own fit fails under MultiWorkerMirroredStrategy "
                    "(keras-team/keras#20585): " + summary["plain_fit_fails"][:200])
    _assert_processes_agree(tmp_path, 2)


@_once_on("jax")
def test_two_process_benchmark_quick_agrees(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import two_process
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    assert two_process.main(["--quick", "--timeout", str(TIMEOUT)]) == 0  # 0: processes agree
    rows = [line.strip(" |").split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for cells in rows:
        assert cells[2].strip() == "True" and cells[5].strip() == "5"  # held and folded away


@pytest.mark.backend_independent
def test_the_recipes_in_the_docs_are_the_code_these_tests_run():
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Training on several machines"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    ran = set()
    for path in (WORKER, os.path.join(ROOT, "benchmarks", "two_process.py")):
        with open(path) as f:
            ran.update(line.strip() for line in f)
    assert blocks
    for block in blocks:
        missing = [line for line in block.splitlines() if line.strip() not in ran]
        assert not missing, missing
