import csv
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_layersparse as ls
from helpers import SHARED
from tf_layersparse.experiments import BatchedMLP, report
from tf_layersparse.experiments.cli import main
from tf_layersparse.experiments.datasets import load_images
from tf_layersparse.experiments.real_data import theory_strength
from tf_layersparse.simulation import relu_mlp, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(SHARED, "datasets")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(DATASETS), reason=f"offline datasets not found at {DATASETS}")

# the paper's studies train in BatchedMLP, written in TensorFlow
pytestmark = pytest.mark.tf_only


def test_generator_shapes_and_true_activity():
    data = simulate(25, 0.3, seed=[0, 1])
    assert data.x_train.shape == (100, 2) and data.x_test.shape == (50, 2)
    assert data.y_train.shape == (100, 1) and data.y_test.shape == (50, 1)
    assert [w.shape for w in data.weights] == [(2, 5)] + [(5, 5)] * 24 + [(5, 1)]
    for w, inactive in zip(data.weights[:-1], data.inactive):
        assert (w.min() >= 0) == bool(inactive) or not inactive
        if inactive:
            assert w.min() >= 0
    assert data.true_active == int(np.sum(~data.inactive[1:]))
    assert data.condensed_depth == 1 + data.true_active
    np.testing.assert_allclose(data.y_train.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(data.y_train.std(), 1, atol=1e-4)
    # the inactivity draw follows s_W: a large sample has the right frequency
    draws = np.concatenate([simulate(25, 0.3, seed=s).inactive for s in range(40)])
    assert abs(np.mean(~draws) - 0.3) < 0.05


@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_batched_trainer_matches_keras_fit(strength):
    data = simulate(6, 0.3, seed=1)
    base = relu_mlp(2, 6, 5, seed=3)
    model = ls.apply_layer_sparsity(base, strength) if strength else base
    net = BatchedMLP([2] + [5] * 6 + [1], 3, seed=0, penalty_group="tensor")
    net.set_replicate_weights(1, model.get_weights())
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(data.x_train, data.y_train, batch_size=10, epochs=15,
                        shuffle=False, verbose=0)
    others = simulate(6, 0.9, seed=2)  # replicates must not disturb each other
    x = np.stack([others.x_train, data.x_train, others.x_train])
    y = np.stack([others.y_train, data.y_train, others.y_train])
    hist = net.fit(x, y, epochs=15, batch_size=10, learning_rate=0.05,
                   strengths=[0.5, strength, 0.0], shuffle=False)
    for expected, actual in zip(model.get_weights(), net.replicate_weights(1)):
        np.testing.assert_allclose(actual, expected, atol=2e-5)
    if strength:  # Keras' logged loss adds the penalty; ours is the data loss
        assert min(ls.negative_part_norms(model).values()) == 0.0
    else:
        np.testing.assert_allclose(hist.loss[:, 1], history.history["loss"], rtol=1e-4)


def _joint_prox(kernel, bias, threshold):
    flat = np.concatenate([kernel.ravel(), bias]).astype(np.float64)
    neg = np.minimum(flat, 0.0)
    norm = np.linalg.norm(neg)
    flat = flat - neg + max(0.0, 1.0 - threshold / norm) * neg if norm else flat
    return flat[:kernel.size].reshape(kernel.shape), flat[kernel.size:]


def test_layer_penalty_groups_kernel_and_bias_as_the_paper():
    # One full-batch step: SGD on the data loss, then the prox of the norm of
    # the layer's negative kernel *and* bias entries taken together.
    data = simulate(3, 0.3, seed=4)
    x, y = data.x_train[:20], data.y_train[:20]
    lr, strength = 0.05, 4.0
    nets = {g: BatchedMLP([2, 5, 5, 5, 1], 1, seed=2, penalty_group=g)
            for g in ("layer", "tensor")}
    start = nets["layer"].replicate_weights(0)
    for k in (1, 2):  # negative entries in both tensors of the penalised layers
        start[2 * k][0, :] = -0.3
        start[2 * k + 1][:] = -0.2
    model = relu_mlp(2, 3, 5)
    model.set_weights(start)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    expected = [w - lr * g.numpy() for w, g in zip(start, grads)]
    for k in (1, 2):
        expected[2 * k], expected[2 * k + 1] = _joint_prox(
            expected[2 * k], expected[2 * k + 1], lr * strength)
    for group, net in nets.items():
        net.set_replicate_weights(0, start)
        net.fit(x, y, epochs=1, batch_size=20, learning_rate=lr, strengths=strength,
                shuffle=False)
    for want, got in zip(expected, nets["layer"].replicate_weights(0)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # separately, the small bias vector's negative part is shrunk on its own
    assert not np.allclose(nets["tensor"].replicate_weights(0)[3], expected[3], atol=1e-3)
    with pytest.raises(ValueError, match="penalty_group"):
        BatchedMLP([2, 5, 1], 1, penalty_group="node")


def test_masked_replicate_is_the_condensed_network():
    net = BatchedMLP([3, 4, 4, 4, 2], 2, seed=1)
    mask = np.ones((2, 4), bool)
    mask[1, 2] = False
    net.set_mask(mask)
    x = np.random.default_rng(0).normal(size=(2, 7, 3)).astype("float32")
    w = net.replicate_weights(1)
    condensed = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, "relu"), keras.layers.Dense(4, "relu"),
        keras.layers.Dense(2)])
    condensed.set_weights(w[:4] + w[6:])
    np.testing.assert_allclose(net.predict(x)[1], condensed(x[1]), atol=1e-6)
    with pytest.raises(ValueError, match="changes the width"):
        net.set_mask(np.array([[False, True, True, True]] * 2))


def test_batched_fold_masks_use_the_library_fold():
    net = BatchedMLP([2, 5, 5, 5, 1], 2, seed=0)
    w = net.replicate_weights(0)
    w[2], w[3] = np.abs(w[2]), np.abs(w[3]) + 0.1  # layer 1 of replicate 0 inactive
    net.set_replicate_weights(0, w)
    w = net.replicate_weights(1)
    w[2][0, 0] = -1.0
    w[4][0, 0] = -1.0
    net.set_replicate_weights(1, w)
    x = np.random.default_rng(0).normal(size=(2, 16, 2)).astype("float32")
    mask, errors = net.fold_masks(x)
    assert mask.tolist() == [[True, False, True, True], [True, True, True, True]]
    assert errors.max() <= 1e-5
    # the mask describes the folded architecture (its weights are refitted)
    folded = ls.fold(net.to_keras(0))
    assert ls.model_cost(folded).depth == mask[0].sum() == 3


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_simulation_cli_quick_writes_table1_deterministically(tmp_path):
    args = ["simulation", "--quick", "--sparsity", "0.1", "0.9", "--runs", "3"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    rows = _read(tmp_path / "a" / "table1.csv")
    assert list(rows[0])[:6] == ["setting", "method", "mse_median", "mse_q3",
                                 "s_median", "s_q3"]
    assert [(r["setting"], r["method"]) for r in rows] == [
        (s, m) for s in ("l-1=10, s_W=0.1", "l-1=10, s_W=0.9")
        for m in ("LS", "SLS", "FLS", "ILS")]
    assert all(float(r["mse_median"]) <= float(r["mse_q3"]) for r in rows)
    assert (tmp_path / "a" / "table1.csv").read_text() == \
        (tmp_path / "b" / "table1.csv").read_text()
    runs = _read(tmp_path / "a" / "runs.csv")
    assert len(runs) == 2 * 3 * 4
    assert all(float(r["fold_error"]) <= 1e-5 for r in runs if r["method"] == "SLS")
    md = (tmp_path / "a" / "table1.md").read_text()
    assert "| l-1=10, s_W=0.9 |" in md and "SLS mse" in md
    if report.plots_available():
        assert (tmp_path / "a" / "table1.png").stat().st_size > 1000


def test_simulation_strength_scale_zero_folds_nothing(tmp_path):
    main(["simulation", "--quick", "--sparsity", "0.3", "--runs", "2",
          "--strength-scale", "0", "--out", str(tmp_path)])
    runs = _read(tmp_path / "runs.csv")
    # without a penalty nothing becomes inactive, so nothing folds
    assert {(r["s_hat"], r["depth"]) for r in runs if r["method"] in ("SLS", "FLS")} \
        == {("9", "11")}
    assert "strengths x 0" in (tmp_path / "table1.md").read_text()


@needs_shared
def test_real_data_cli_quick_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TF_LAYERSPARSE_DATA_DIR", DATASETS)
    # a small network: the test checks the pipeline and its outputs, not accuracy
    main(["real-data", "--quick", "--dataset", "mnist", "kmnist", "--hidden-layers", "3",
          "--width", "16",
          # the session's TFDS directory (conftest), prepared once for all tests
          "--tfds-dir", os.environ["TFDS_DATA_DIR"], "--out", str(tmp_path / "out")])
    rows = _read(tmp_path / "out" / "table2.csv")
    assert list(rows[0]) == list(report.TABLE2_FIELDS)
    assert [(r["dataset"], r["method"]) for r in rows] == [
        ("mnist", "CE"), ("mnist", "FCE"), ("kmnist", "CE"), ("kmnist", "FCE")]
    assert "substitute" in rows[2]["source"] and "substitute" not in rows[0]["source"]
    assert "NOTE: kmnist: offline substitute" in capsys.readouterr().out
    for r in rows:
        assert 0.0 <= float(r["accuracy_mean"]) <= 1.0
    if report.plots_available():
        for name in ("figure2.png", "figure3.png"):
            assert (tmp_path / "out" / name).stat().st_size > 1000


@needs_shared
def test_offline_loading_is_explicit_about_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_substitute"):
        load_images("kmnist", DATASETS, tfds_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("mnist", str(tmp_path / "nowhere"), tfds_dir=str(tmp_path))
    with pytest.raises(ValueError, match="must be one of"):
        load_images("svhn", DATASETS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("cifar10", str(tmp_path / "nowhere.npz"))
    sub = load_images("kmnist", DATASETS, allow_substitute=True)
    assert sub.substitute and sub.x_train.shape == (10_000, 784)
    assert 0.0 <= sub.x_train.min() and sub.x_train.max() <= 1.0


def test_theory_strength_is_log_p_over_root_n():
    assert theory_strength(62_710, 10_000) == pytest.approx(np.log(62_710) / 100)


def test_speedup_benchmark_quick_runs():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import batched_speedup
    finally:
        sys.path.pop(0)
    assert batched_speedup.main(["--quick"]) > 0


@needs_shared
def test_offline_datasets_are_the_files_they_name():
    # MNIST and Fashion-MNIST have identical file names; TFDS must not mix them up
    from tf_layersparse.experiments.datasets import _read_idx

    for name in ("mnist", "fashion_mnist"):
        images = load_images(name, DATASETS)  # both in the session's TFDS directory
        raw = _read_idx(os.path.join(DATASETS, name, "t10k-images-idx3-ubyte.gz"))
        raw_labels = _read_idx(os.path.join(DATASETS, name, "t10k-labels-idx1-ubyte.gz"))
        # TFDS shuffles examples: compare the multisets of (pixel sum, label)
        ours = sorted(zip(np.round(images.x_test.sum(1) * 255).astype(int), images.y_test))
        theirs = sorted(zip(raw.reshape(len(raw), -1).sum(1).astype(int), raw_labels))
        assert ours == theirs, name
