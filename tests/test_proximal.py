"""The proximal step through Keras constraints: any model, any backend,
schedules, adaptive optimizers, BatchNorm blocks, bad input."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.proximal import (
    _raw_kernel,
    group_step,
    optimizer_step_sizes,
    sparsity_groups,
)
from tf_layersparse.regularizers import group_prox, layer_sparsity_prox

from helpers import to_numpy


def _data(n=256, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.maximum(x @ rng.normal(size=(d, 1)), 0).astype("float32")
    return x, y


def _functional(strength=0.3, depth=4, group="tensor", **kw):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    for i in range(depth):
        reg = ls.LayerSparsity(strength, group=group, **kw)
        h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                               bias_regularizer=reg, name=f"h{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def _min(layer):
    return min(float(np.min(to_numpy(layer.kernel))), float(np.min(to_numpy(layer.bias))))


# ------------------------------------------------------------------ group_prox


def test_group_prox_with_one_step_is_the_closed_form_on_the_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(3, 4)), rng.normal(size=(4,))]
    out = group_prox([keras.ops.convert_to_tensor(p) for p in parts], 0.3, 2.0)
    flat = np.concatenate([p.ravel() for p in parts])
    expected = to_numpy(layer_sparsity_prox(keras.ops.convert_to_tensor(flat), 0.6))
    np.testing.assert_allclose(np.concatenate([to_numpy(o).ravel() for o in out]),
                               expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_group_prox_per_coordinate_minimises_its_objective(seed):
    rng = np.random.default_rng(seed)
    z = [rng.normal(size=5), rng.normal(size=3)]
    steps = [rng.uniform(0.05, 2.0, size=5), rng.uniform(0.05, 2.0, size=3)]
    t = rng.uniform(0.1, 3.0)
    out = group_prox([keras.ops.convert_to_tensor(v) for v in z],
                     [keras.ops.convert_to_tensor(s) for s in steps], t)
    w = np.concatenate([to_numpy(o) for o in out])
    zf, sf = np.concatenate(z), np.concatenate(steps)

    def objective(v):
        return np.sum((v - zf) ** 2 / (2 * sf)) + t * np.linalg.norm(np.minimum(v, 0))

    for _ in range(200):
        assert objective(w) <= objective(w + rng.normal(scale=0.05, size=w.shape)) + 1e-9
    # exact zero exactly when the subgradient condition says so
    zero_expected = np.linalg.norm(np.minimum(zf, 0) / sf) <= t
    assert (np.min(w) >= 0) == zero_expected


# ------------------------------------------------------------------ any model


@pytest.mark.parametrize("group", ["tensor", "layer"])
def test_plain_functional_model_with_the_callback_reaches_exact_zeros_and_folds(group):
    x, y = _data()
    model = _functional(0.5, group=group)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x, y, batch_size=32, epochs=40, verbose=0,
                        callbacks=[ls.ActiveLayers()])
    counts = history.history["active_layers"]
    assert counts[-1] < counts[0]
    inactive = [layer for layer in model.layers if layer.name.startswith("h")
                and ls.negative_part_norms(model)[layer.name] == 0.0]
    assert inactive and all(_min(layer) >= 0.0 for layer in inactive)
    folded, report = ls.fold(model, verify=x[:64], return_report=True)
    assert report.after.depth < report.before.depth
    assert report.max_relative_error <= 1e-5
    # the constraints are gone and the penalty has its gradient again
    assert all(v.constraint is None for v in model.trainable_variables)
    assert not any(reg._driven for layer in model.layers
                   for reg in [getattr(layer, "kernel_regularizer", None)] if reg)


def test_subclassed_model_gets_the_proximal_step():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            reg = ls.LayerSparsity(0.5)
            self.first = keras.layers.Dense(8, activation="relu")
            self.hidden = [keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                                              bias_regularizer=reg) for _ in range(3)]
            self.out = keras.layers.Dense(1)

        def call(self, x):
            h = self.first(x)
            for layer in self.hidden:
                h = layer(h)
            return self.out(h)

    x, y = _data()
    model = Net()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    if keras.backend.backend() == "tensorflow":
        # TensorFlow builds a subclassed model at its first step, after on_train_begin
        with pytest.raises(ValueError, match="not built yet"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])
        model = Net()
        model(x[:1])
        model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=32, epochs=40, verbose=0, callbacks=[ls.ActiveLayers()])
    norms = [ls.negative_part_norms(model)[layer.name] for layer in model.hidden]
    assert 0.0 in norms
    assert all(_min(layer) >= 0.0 for layer, n in zip(model.hidden, norms) if n == 0.0)


def test_without_the_callback_nothing_is_installed():
    model = _functional(0.5)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(*_data(64), epochs=1, verbose=0)
    assert all(v.constraint is None for v in model.trainable_variables)


def test_repeated_fits_reuse_the_traced_step_and_restore_the_plain_one():
    x, y = _data(64)
    model = _functional(0.5)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, epochs=1, verbose=0)
    plain = model.train_function
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])
    assert model.train_function is plain  # traced without the proximal step
    sparse = model._layersparse_train_function["sparse"]
    assert sparse is not None and sparse is not plain
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])
    assert model._layersparse_train_function["sparse"] is sparse  # not traced again
    model.compile(keras.optimizers.SGD(0.05), "mse")  # a new compile traces anew
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])
    assert model._layersparse_train_function["sparse"] is not sparse


def _one_step(optimizer, strength=0.7, seed=3):
    """One full-batch step of a linear layer through fit, and the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    reg = ls.LayerSparsity(strength, group="layer")
    layer = keras.layers.Dense(2, kernel_regularizer=reg, bias_regularizer=reg,
                               bias_initializer=keras.initializers.Constant(-0.1))
    model = keras.Sequential([keras.Input((3,)), layer])
    k0, b0 = (np.array(to_numpy(w), np.float64) for w in (layer.kernel, layer.bias))
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[ls.ActiveLayers()])
    residual = x @ k0 + b0 - y
    grads = (2 * x.T @ residual / residual.size, 2 * residual.sum(0) / residual.size)
    return layer, (k0, b0), grads


def _np_group_prox(values, steps, t):
    z = np.concatenate([v.ravel() for v in values])
    s = np.concatenate([np.broadcast_to(st, v.shape).ravel() for v, st in zip(values, steps)])
    neg = np.minimum(z, 0)
    if np.linalg.norm(neg / s) <= t:
        w = np.maximum(z, 0)
    else:
        lo, hi = 0.0, np.linalg.norm(neg)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.linalg.norm(neg / (mid + s * t)) > 1 else (lo, mid)
        w = np.maximum(z, 0) + neg * (lo / (lo + s * t))
    sizes = np.cumsum([v.size for v in values])[:-1]
    return [p.reshape(v.shape) for p, v in zip(np.split(w, sizes), values)]


def test_sgd_schedule_uses_this_steps_learning_rate():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.4, 0.001])
    layer, (k0, b0), (gk, gb) = _one_step(keras.optimizers.SGD(schedule))
    lr = 0.4  # iteration 0 of the schedule
    expected = _np_group_prox([k0 - lr * gk, b0 - lr * gb], [lr, lr], 0.7)
    np.testing.assert_allclose(to_numpy(layer.kernel), expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.bias), expected[1], rtol=1e-5, atol=1e-6)


def test_adam_step_is_the_prox_in_adams_metric():
    layer, (k0, b0), (gk, gb) = _one_step(keras.optimizers.Adam(0.05))
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-7
    alpha = lr * math.sqrt(1 - b2) / (1 - b1)
    updated, steps = [], []
    for w, g in ((k0, gk), (b0, gb)):
        m, v = (1 - b1) * g, (1 - b2) * g**2
        updated.append(w - alpha * m / (np.sqrt(v) + eps))
        steps.append(alpha / (np.sqrt(v) + eps))
    expected = _np_group_prox(updated, steps, 0.7)
    np.testing.assert_allclose(to_numpy(layer.kernel), expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.bias), expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_adaptive_optimizers_reach_exact_zeros(name):
    x, y = _data()
    optimizer = {"adam": keras.optimizers.Adam(1e-2), "adamw": keras.optimizers.AdamW(1e-2),
                 "rmsprop": keras.optimizers.RMSprop(1e-2)}[name]
    model = _functional(0.3)
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=32, epochs=15, verbose=0, callbacks=[ls.ActiveLayers()])
    zeros = [n for n in ls.negative_part_norms(model).values() if n == 0.0]
    assert zeros
    folded, report = ls.fold(model, verify=x[:64], return_report=True)
    assert report.after.depth < report.before.depth and report.max_relative_error <= 1e-5


def test_user_constraints_still_apply():
    x, y = _data()
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    reg = ls.LayerSparsity(0.1)
    h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                           kernel_constraint=keras.constraints.MaxNorm(0.5, axis=0))(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(0.5), "mse")
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[ls.ActiveLayers()])
    kernel = to_numpy(model.layers[2].kernel)
    assert np.max(np.linalg.norm(kernel, axis=0)) <= 0.5 + 1e-5
    assert isinstance(model.layers[2].kernel.constraint, keras.constraints.MaxNorm)


def test_snap_zeroes_small_negative_parts_of_subgradient_tensors():
    model = _functional(0.5, depth=2, proximal=False, snap_tolerance=1e-2)
    small, large = model.get_layer("h0"), model.get_layer("h1")
    small.kernel.assign(np.abs(to_numpy(small.kernel)) - np.eye(8, dtype="float32") * 1e-3)
    large.kernel.assign(-np.ones(large.kernel.shape, "float32"))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(*_data(32), epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])
    norms = ls.negative_part_norms(model)
    assert norms["h0"] == 0.0 and norms["h1"] == pytest.approx(8.0)


def test_gradient_accumulation_is_refused():
    model = _functional()
    model.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=2), "mse")
    with pytest.raises(ValueError, match="gradient accumulation"):
        model.fit(*_data(32), epochs=1, verbose=0, callbacks=[ls.ActiveLayers()])


# ------------------------------------------------------------------ blocks


def _block_model(use_bias=False, negative_gamma=False):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    reg = ls.LayerSparsity(0.5)
    h = keras.layers.Conv2D(4, 3, use_bias=use_bias, kernel_regularizer=reg, name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(keras.layers.Flatten()(h)[:, None, None, :]))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 2, 4) * (np.array([1, -1, 1, 1]) if negative_gamma else 1)
    bn.set_weights([gamma, rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)])
    return model


@pytest.mark.parametrize("block_step", ["effective", "raw"])
def test_block_step_makes_effective_weights_nonnegative(block_step):
    model = _block_model(use_bias=True, negative_gamma=True)
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    for reg in (conv.kernel_regularizer,):
        reg.block_step = block_step
    group, = sparsity_groups(model, batchnorm={"conv": bn})
    assert group.negative_norm() > 0
    values = group_step(group, keras.optimizers.SGD(1e3))  # huge step: zero
    for variable in group.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
    kernel_eff, bias_eff = group.effective_weights()
    assert np.min(kernel_eff) >= 0 and np.min(bias_eff) >= 0
    assert group.negative_norm() == 0.0
    if block_step == "raw":
        assert np.min(to_numpy(bn.gamma)) >= 0


def test_block_step_maps_back_to_raw_weights_by_selection():
    """Entries the effective step left alone keep their raw value and zeroed
    ones are exactly 0, even where `raw * s / s` does not round-trip in
    float32 (a compiler that rewrites the division otherwise left zeroed
    entries at +-1e-11, and blocks active, on JAX)."""
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(200, 3)).astype("float32")
    raw[0, 0] = -1.0
    factor = np.array([0.3, -1.7, 0.0], dtype="float32")
    old = raw * factor
    assert np.any(old / np.where(factor == 0, 1, factor) != raw)  # no exact round trip
    new = np.where(old < 0, 0.0, old).astype("float32")
    new[0, 0] = 0.5 * old[0, 0]  # shrunk, not zeroed
    out = to_numpy(_raw_kernel(*(keras.ops.convert_to_tensor(t) for t in (new, old, raw, factor))))
    untouched = (old >= 0) | (factor == 0)
    np.testing.assert_array_equal(out[untouched], raw[untouched])
    zeroed = (new == 0) & ~untouched
    assert zeroed.sum() > 100 and np.all(out[zeroed] == 0)
    assert out[0, 0] == pytest.approx(-0.5, rel=1e-6)


def test_block_step_with_a_small_step_only_shrinks():
    model = _block_model()
    model.get_layer("conv").kernel_regularizer.block_step = "effective"
    bn = model.get_layer("bn")
    group, = sparsity_groups(model, batchnorm={"conv": bn})
    before = group.negative_norm()
    values = group_step(group, keras.optimizers.SGD(1e-3))
    for variable in group.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
    after = group.negative_norm()
    assert 0 < after < before
    assert after == pytest.approx(before - 1e-3 * 0.5, rel=1e-3)


# ------------------------------------------------------------------ bad input


def test_nan_weights_count_as_active_and_are_named():
    model = _functional(0.5, depth=2)
    layer = model.get_layer("h0")
    layer.kernel.assign(np.full(layer.kernel.shape, np.nan, "float32"))
    model.get_layer("h1").kernel.assign(np.abs(to_numpy(model.get_layer("h1").kernel)))
    model.get_layer("h1").bias.assign(np.ones(8, "float32"))
    assert math.isnan(ls.negative_part_norms(model)["h0"])
    assert ls.active_layer_count(model) == 1
    tracker = ls.ActiveLayers(proximal=False)
    tracker.set_model(model)
    tracker.on_train_begin()
    logs = {}
    with pytest.warns(UserWarning, match="'h0'.*NaN"):
        tracker.on_epoch_end(0, logs)
    assert tracker.nonfinite == ["h0"] and logs["active_layers"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.backend_independent
def test_tolerance_must_be_finite_and_nonnegative(bad):
    with pytest.raises(ValueError, match="tolerance"):
        ls.ActiveLayers(tolerance=bad)


@pytest.mark.parametrize("bad", [0, 1.5, True, float("inf")])
@pytest.mark.backend_independent
def test_patience_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="patience"):
        ls.ActiveLayers(patience=bad)


def test_clone_model_and_keras_file_keep_every_setting(tmp_path):
    base = _functional(0.2)
    model = ls.apply_layer_sparsity(
        keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(4, activation="relu")
                                                for _ in range(3)] + [keras.layers.Dense(1)]),
        0.2, proximal=False, snap_tolerance=1e-3, group="layer", block_step="raw")
    del base
    for copy in (keras.models.clone_model(model), _reload(model, tmp_path)):
        assert isinstance(copy, ls.LayerSparseModel)
        regs = [layer.kernel_regularizer for layer in copy.layers
                if isinstance(getattr(layer, "kernel_regularizer", None), ls.LayerSparsity)]
        assert regs and all(r.get_config() == {
            "strength": 0.2, "proximal": False, "group": "layer",
            "snap_tolerance": 1e-3, "block_step": "raw"} for r in regs)


def _reload(model, tmp_path):
    path = str(tmp_path / "m.keras")
    model.save(path)
    return keras.saving.load_model(path)


def test_refit_uses_the_loss_and_optimizer_it_is_given():
    class Unregistered(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    x, y = _data(64)
    model = ls.apply_layer_sparsity(_functional(0.1), 0.1)
    model.compile(keras.optimizers.SGD(0.01), Unregistered(), metrics=["mae"])
    small, history = ls.refit(model, x, y, epochs=1, verbose=0)
    assert isinstance(small.loss, Unregistered) and "mae" in history.history
    small, _ = ls.refit(model, x, y, loss=Unregistered(), optimizer="adam", epochs=1, verbose=0)
    assert isinstance(small.optimizer, keras.optimizers.Adam)


# ------------------------------------------------------------------ distribution

_DISTRIBUTED = {
    "tensorflow": """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        def scopes():
            yield tf.distribute.OneDeviceStrategy("/cpu:0").scope()
            yield tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()
    """,
    "jax": """
        import contextlib, jax
        def scopes():
            keras.distribution.set_distribution(None)
            yield contextlib.nullcontext()
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
            yield contextlib.nullcontext()
    """,
}


def test_distributed_training_gives_the_same_exact_zeros():
    backend = keras.backend.backend()
    if backend not in _DISTRIBUTED:
        pytest.skip(f"no multi-device CPU setup for the {backend} backend")
    script = textwrap.dedent("""
        import os, sys
        import keras, numpy as np
    """) + textwrap.dedent(_DISTRIBUTED[backend]) + textwrap.dedent("""
        import tf_layersparse as ls
        for name, rate in (("SGD", 0.05), ("Adam", 0.01)):
          results = []
          for scope in scopes():
              keras.utils.set_random_seed(0)
              rng = np.random.default_rng(0)
              x = rng.normal(size=(256, 4)).astype("float32")
              y = np.maximum(x @ rng.normal(size=(4, 1)), 0).astype("float32")
              with scope:
                  inputs = keras.Input((4,))
                  h = keras.layers.Dense(8, activation="relu")(inputs)
                  for i in range(3):
                      reg = ls.LayerSparsity(1.0, group="layer")
                      h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                                             bias_regularizer=reg)(h)
                  model = keras.Model(inputs, keras.layers.Dense(1)(h))
                  model.compile(getattr(keras.optimizers, name)(rate), "mse")
              model.fit(x, y, batch_size=32, epochs=10, verbose=0, shuffle=False,
                        callbacks=[ls.ActiveLayers()])
              results.append([np.array(w) for w in model.get_weights()])
          one, many = results
          zeros = sum(int(n == 0.0) for n in ls.negative_part_norms(model).values())
          same = all(np.array_equal(a == 0, b == 0) for a, b in zip(one, many))
          close = max(float(np.max(np.abs(a - b))) for a, b in zip(one, many))
          print("RESULT", zeros, same, close)
    """)
    env = dict(os.environ, KERAS_BACKEND=backend,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 2, out.stderr[-3000:]
    for line in lines:  # SGD, then Adam
        _, zeros, same, close = line.split()
        assert int(zeros) >= 1 and same == "True" and float(close) < 1e-5, line


@pytest.mark.parametrize("was_inactive", [True, False])
def test_statistics_drift_does_not_reactivate_an_inactive_block(was_inactive):
    model = _block_model()
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    group, = sparsity_groups(model, batchnorm={"conv": bn})
    conv.set_weights([np.abs(conv.get_weights()[0])])
    gamma, _, mean, var = bn.get_weights()
    scale = gamma / np.sqrt(var + bn.epsilon)
    bn.set_weights([gamma, scale * mean + 0.01, mean, var])  # b_eff = 0.01: inactive
    assert group.negative_norm() == 0.0
    previous = (np.array(mean), np.array(var))
    # the forward pass moved the moving mean up: b_eff would be 0.01 - 0.5 * scale < 0
    bn.moving_mean.assign(mean + 0.5)
    # a step far too small to zero that drift (threshold 1e-6 * 0.5)
    values = group_step(group, keras.optimizers.SGD(1e-6), previous, np.bool_(was_inactive))
    for variable in group.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
    if was_inactive:
        assert group.negative_norm() == 0.0
        assert bool(to_numpy(values["inactive"]))
    else:  # an active block gets no help from the drift rule
        assert group.negative_norm() > 0.1
        assert not bool(to_numpy(values["inactive"]))
