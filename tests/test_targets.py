"""Depth on demand: `ActiveLayers(target=...)` reaches, holds and reports its target."""

import csv
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from helpers import assert_folds_exactly, saved_and_loaded, set_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=256, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")
    return x, np.maximum(x[:, :1], 0) + 0.5 * x[:, 1:2]


def _mlp(hidden=5, width=8, strength=0.01, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(width, activation="relu", name="first")(inputs)
    for i in range(hidden):
        reg = ls.LayerSparsity(strength, group="layer")
        h = keras.layers.Dense(width, activation="relu", kernel_regularizer=reg,
                               bias_regularizer=reg, name=f"hidden{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def _inactive(model):
    return sorted(name for name, norm in ls.negative_part_norms(model).items() if norm == 0.0)


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.02, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(3e-3),
    "adamw": lambda: keras.optimizers.AdamW(3e-3, weight_decay=1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_target_is_reached_held_and_folded_exactly(optimizer):
    x, y = _data()
    model = _mlp()
    model.compile(OPTIMIZERS[optimizer](), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=3, end_step=96, growth=1.3))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DepthTarget not reached")
        history = model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[callback])
    progress = callback.progress
    assert progress.reached and progress.inactive == 3
    # exactly the held layers end inactive, after 64 steps without pull
    assert _inactive(model) == sorted(progress.held)
    assert history.history["held_layers"][-1] == 3
    assert history.history["active_layers"][-1] == 2
    folded, report = assert_folds_exactly(model)
    assert ls.model_cost(folded).depth == ls.model_cost(model).depth - 3


def test_held_layers_stay_inactive_after_the_target_is_met():
    x, y = _data()
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=2, end_step=48))
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if callback.progress.reached:
                seen.append(set(callback.progress.held) <= set(_inactive(model)))

    model.fit(x, y, batch_size=16, epochs=12, verbose=0, callbacks=[callback, Watch()])
    assert seen and all(seen)


def test_flops_target_folds_to_at_most_that_fraction():
    x, y = _data()
    model = _mlp(hidden=6)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(flops=0.7, end_step=96))
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[callback])
    assert callback.progress.reached
    assert history.history["target_flops"][-1] == pytest.approx(0.7)
    assert _inactive(model) == sorted(callback.progress.held)
    folded, _ = assert_folds_exactly(model)
    fraction = ls.model_cost(folded).flops / ls.model_cost(model).flops
    assert fraction == pytest.approx(callback.progress.flops_fraction)
    assert fraction <= 0.7


def test_planned_flops_are_what_fold_builds():
    model = _mlp(hidden=4)
    for name in ("hidden1", "hidden2"):
        layer = model.get_layer(name)
        layer.set_weights([np.abs(w) for w in layer.get_weights()])
    plan = ls.folding.plan.plan_fold(model)
    assert ls.targets.planned_flops(plan) == ls.model_cost(ls.fold(model)).flops
    assumed = ls.folding.plan.plan_fold(model, assume_inactive={"hidden0", "hidden1",
                                                                "hidden2"})
    layer = model.get_layer("hidden0")
    layer.set_weights([np.abs(w) for w in layer.get_weights()])
    assert ls.targets.planned_flops(assumed) == ls.model_cost(ls.fold(model)).flops


def _block_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 1))
    h = inputs
    for i in range(3):
        h = keras.layers.Conv2D(4, 3, use_bias=False, name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


def test_blocks_reach_the_target_under_moving_statistics():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(128, 10, 10, 1)).astype("float32")
    y = rng.normal(size=(128, 2)).astype("float32")
    model = ls.apply_layer_sparsity(_block_net(), 0.1, nonnegative_inputs=True)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=1, end_step=64, growth=1.2,
                                                     frequency=2), nonnegative_inputs=True)
    model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[callback])
    # the last block feeds the pooling, so only the first two can go
    assert set(callback.progress.removable) == {"conv0", "conv1"}
    assert callback.progress.reached
    assert _inactive(model) == sorted(callback.progress.held)
    folded, _ = assert_folds_exactly(model, nonnegative_inputs=True)
    convs = [l for l in folded.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 2


def test_target_zero_is_plain_training():
    x, y = _data()
    plain = _mlp(strength=0.0)
    plain.compile(keras.optimizers.SGD(0.05), "mse")
    steered = _mlp(strength=0.5)
    steered.set_weights(plain.get_weights())
    steered.compile(keras.optimizers.SGD(0.05), "mse")
    plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    history = steered.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                          callbacks=[ls.ActiveLayers(target=0)])
    for a, b in zip(plain.get_weights(), steered.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert history.history["strength_multiplier"][-1] == 1.0


def test_logs_reach_csv_logger(tmp_path):
    x, y = _data(64)
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    path = tmp_path / "log.csv"
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[ls.ActiveLayers(target=2), keras.callbacks.CSVLogger(str(path))])
    with open(path) as f:
        header = next(csv.reader(f))
    for key in ("active_layers", "target_inactive", "held_layers", "flops_fraction",
                "strength_multiplier"):
        assert key in header


def test_progress_bar_shows_the_target(capsys):
    x, y = _data(64)
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=2, callbacks=[ls.ActiveLayers(target=2)])
    out = capsys.readouterr().out
    assert "target_inactive" in out and "strength_multiplier" in out


def test_a_missed_target_warns_with_what_was_reached():
    x, y = _data(32)
    model = _mlp()
    model.compile(keras.optimizers.SGD(1e-4), "mse")
    callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=4, growth=1.01))
    with pytest.warns(UserWarning, match=r"not reached by step \d+.*held"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert not callback.progress.reached


# ------------------------------------------------------------------ bad input


def test_target_above_what_can_be_folded_names_the_maximum_and_why():
    inputs = keras.Input((4,))
    reg = ls.LayerSparsity(0.1)
    h = keras.layers.Dense(8, activation="relu")(inputs)
    h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg, name="a")(h)
    h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg, name="b")(h)
    # 'c' feeds two layers, so no merge can remove it
    c = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg, name="c")(h)
    out = keras.layers.Add()([keras.layers.Dense(1)(c), keras.layers.Dense(1)(c)])
    model = keras.Model(inputs, out)
    model.compile("sgd", "mse")
    x, y = _data(16)
    with pytest.raises(ValueError, match=r"more than the 2 penalised layers.*'c'.*feeds 2"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ls.ActiveLayers(target=3)])
    # nothing stays installed after the refusal
    assert all(not isinstance(v.constraint, keras.constraints.Constraint)
               for v in model.trainable_variables)


@pytest.mark.backend_independent
def test_both_a_count_and_a_flops_target_is_an_error():
    with pytest.raises(ValueError, match="exactly one of `inactive`"):
        ls.DepthTarget(3, flops=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ls.DepthTarget()


@pytest.mark.parametrize("kwargs, match", [
    (dict(inactive=-1), "integer >= 0"),
    (dict(inactive=2.5), "integer >= 0"),
    (dict(flops=0.0), r"fraction in \(0, 1\]"),
    (dict(flops=float("nan")), "fraction"),
    (dict(inactive=1, begin_step=10, end_step=5), "must come before"),
    (dict(inactive=1, growth=1.0), "growth"),
    (dict(inactive=1, frequency=0), "frequency"),
])
@pytest.mark.backend_independent
def test_bad_target_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ls.DepthTarget(**kwargs)


def test_begin_after_the_default_end_is_an_error():
    x, y = _data(32)
    model = _mlp()
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="must come before its end step"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[ls.ActiveLayers(target=ls.DepthTarget(1, begin_step=100))])


def test_a_target_on_a_model_without_penalty_is_an_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no layer with a LayerSparsity"):
        model.fit(*_data(16), epochs=1, verbose=0, callbacks=[ls.ActiveLayers(target=1)])


@pytest.mark.backend_independent
def test_target_must_be_a_depth_target_or_an_integer():
    with pytest.raises(TypeError, match="DepthTarget or an integer"):
        ls.ActiveLayers(target="3")
    with pytest.raises(ValueError, match="proximal=True"):
        ls.ActiveLayers(target=1, proximal=False)


@pytest.mark.backend_independent
def test_only_a_target_adds_a_batch_hook():
    from keras.src.utils.python_utils import is_default

    assert is_default(ls.ActiveLayers().on_train_batch_end)
    assert not is_default(ls.ActiveLayers(target=1).on_train_batch_end)


@pytest.mark.backend_independent
def test_configs_round_trip(tmp_path):
    target = ls.DepthTarget(flops=0.5, begin_step=3, end_step=40, growth=1.2)
    again = ls.DepthTarget.from_config(target.get_config())
    assert again.get_config() == target.get_config()
    callback = ls.ActiveLayers(target=target, nonnegative_inputs=True)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(callback))
    assert restored.target.get_config() == target.get_config()
    assert restored.nonnegative_inputs


def test_trained_model_saves_without_the_steering_variables(tmp_path):
    x, y = _data(64)
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    count = len(model.weights)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ls.ActiveLayers(target=1)])
    assert len(model.weights) == count
    loaded = saved_and_loaded(model, tmp_path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


# ------------------------------------------------------------------ refit with a teacher


def test_refit_with_a_teacher_distils_and_leaves_the_teacher_alone():
    x, y = _data()
    labels = (y[:, 0] > 0.3).astype("int32")
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="outputs shape"):
        ls.refit(model, x, labels, teacher=teacher, epochs=1, verbose=0)
    head = keras.layers.Dense(2, name="logits")
    base = keras.Model(model.inputs, head(model.layers[-2].output))
    base.compile(keras.optimizers.SGD(0.05),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher = keras.models.clone_model(base)
    teacher.set_weights(base.get_weights())
    before = [w.copy() for w in teacher.get_weights()]
    results = {}
    for weight in (0.0, 0.9):
        student, history = ls.refit(base, x, labels, teacher=teacher, distillation_weight=weight,
                                    temperature=2.0, epochs=2, batch_size=32, verbose=0,
                                    seed=0, shuffle=False)
        results[weight] = history.history["loss"]
        assert len(student.weights) == len(ls.fold(base).weights)  # no teacher weights
    plain, history = ls.refit(base, x, labels, epochs=2, batch_size=32, verbose=0, seed=0,
                              shuffle=False)
    np.testing.assert_allclose(results[0.0], history.history["loss"], rtol=1e-5)
    assert not np.allclose(results[0.9], history.history["loss"])
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="distillation_weight"):
        ls.refit(base, x, labels, teacher=teacher, distillation_weight=2, epochs=1, verbose=0)


# ------------------------------------------------------------------ distribution

_SCRIPT = """
    import shutil, tempfile
    import keras, numpy as np
    import tf_layersparse as ls
    FOLDER = tempfile.mkdtemp()
    class Copy(keras.callbacks.Callback):  # what an interruption after epoch 8 leaves
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 8:
                shutil.copytree(FOLDER + "/backup", FOLDER + "/after8")
    def run(backup=None):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 4)).astype("float32")
        y = (np.maximum(x[:, :1], 0) + 0.5 * x[:, 1:2]).astype("float32")
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu")(inputs)
        for i in range(5):
            reg = ls.LayerSparsity(0.01, group="layer")
            h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                                   bias_regularizer=reg, name=f"hidden{i}")(h)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.SGD(0.05), "mse")
        callback = ls.ActiveLayers(target=ls.DepthTarget(3, end_step=96, frequency=4,
                                                         growth=1.3))
        extra = [] if backup is None else [keras.callbacks.BackupAndRestore(FOLDER + backup)]
        extra += [Copy()] if backup == "/backup" else []
        history = model.fit(x, y, batch_size=32, epochs=16, verbose=0, shuffle=False,
                            callbacks=[callback, *extra])
        inactive = sorted(n for n, v in ls.negative_part_norms(model).items() if v == 0.0)
        return ((callback.progress.reached, inactive), callback.progress.holds,
                model.get_weights(), len(history.history["loss"]))
    def resumed():
        # backed up after every epoch, then resumed after epoch 8 as a restarted script would
        (reached, inactive), holds, weights, _ = run("/backup")
        _, resumed_holds, resumed_weights, epochs = run("/after8")
        same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                   for a, b in zip(weights, resumed_weights))
        return reached, inactive, epochs == 8, resumed_holds == holds, same
"""

_SCOPES = {
    "tensorflow": """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        one = tf.distribute.OneDeviceStrategy("/cpu:0")
        with one.scope():
            print("RESULT", *run()[0])
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            print("RESULT", *resumed())
    """,
    "jax": """
        import jax
        print("RESULT", *run()[0])
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()))
        print("RESULT", *resumed())
    """,
}


def _run(script, env, timeout=600):
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_distributed_training_reaches_the_same_held_set_and_resumes():
    backend = keras.backend.backend()
    if backend not in _SCOPES:
        pytest.skip(f"no multi-device CPU setup for the {backend} backend")
    script = textwrap.dedent(_SCRIPT) + textwrap.dedent(_SCOPES[backend])
    env = dict(os.environ, KERAS_BACKEND=backend,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = _run(script, env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 2, out.stderr[-3000:]
    # the same held set on one device and on two; and on two devices, a run
    # resumed by BackupAndRestore takes the same holds and ends with the same weights
    assert lines[1] == lines[0] + " True True True" and lines[0].startswith("RESULT True"), lines


# Two worker processes (JAX, torch, TensorFlow's MultiWorkerMirroredStrategy):
# tests/test_distributed.py


def test_the_pull_begins_once_training_has_taken_off():
    x, y = _data()
    model = _mlp(width=16)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    target = ls.DepthTarget(inactive=2, end_step=128, wait_for_takeoff=True)
    callback = ls.ActiveLayers(target=target)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DepthTarget not reached")
        history = model.fit(x, y, batch_size=16, epochs=12, verbose=0, callbacks=[callback])
    latest, end = target.schedule(192)
    began = callback.progress.begin_step
    # this toy's loss halves within its first three epochs on every
    # backend: the pull begins then, before the latest begin of the warm-up
    assert 0 < began < latest and end == 128
    assert history.history["pull_begin_step"][-1] == began
    assert callback.progress.reached and min(callback.progress.holds.values()) > began
    assert max(callback.progress.holds.values()) <= end
    assert_folds_exactly(model)
