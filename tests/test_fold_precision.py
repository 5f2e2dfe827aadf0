"""Folds to float precision, and a self-check whose probes would show it.

A merged layer's weights are composed in float64 and rounded to float32
once, so a chain of dozens of layers folds into one whose kernel is the
correctly rounded product; the folded model then differs from the original
by float32 evaluation error only (max relative error <= 1e-5 on fresh
inputs). The self-check probes several batches, one of them in the input's
real range, and judges each against its own scale.
"""

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.folding.api import _errors, input_ranges, probe_batches
from zoo import make_identities


def _held_out_error(model, folded, shape, batch=64):
    """Max relative error over held-out batches, none of them the fold's
    probes (two scales, two laws), each against its own largest output.
    `predict` compiles each model once for all of them (JAX would compile
    every operation of an eager call)."""
    rng = np.random.default_rng(1234)
    batches = [np.abs(rng.standard_normal((batch,) + shape)) for _ in range(2)]
    batches += [rng.uniform(0.0, 255.0, (batch,) + shape), rng.uniform(0.0, 1e-2, (batch,) + shape)]
    x = np.concatenate(batches).astype("float32")
    expected = np.asarray(model.predict(x, batch_size=batch, verbose=0), np.float64)
    actual = np.asarray(folded.predict(x, batch_size=batch, verbose=0), np.float64)
    assert np.all(np.isfinite(expected)) and np.all(np.isfinite(actual))
    return max(np.max(np.abs(a - b)) / np.max(np.abs(a))
               for a, b in zip(np.split(expected, len(batches)), np.split(actual, len(batches))))


def _dense_chain(depth, width=12, batchnorm_every=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,))
    h = inputs
    for i in range(depth):
        h = keras.layers.Dense(width, name=f"d{i}")(h)
        if i % batchnorm_every == 0:
            h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    make_identities(model, seed)
    return model


def _expected_dense(model):
    """The chain's one affine map, composed in float64 from the weights."""
    kernel, bias = None, None
    for layer in model.layers[1:]:
        weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
        if isinstance(layer, keras.layers.Dense):
            k, b = weights
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = weights
            scale = gamma / np.sqrt(var + layer.epsilon)
            k, b = np.diag(scale), beta - mean * scale
        else:
            continue
        kernel, bias = (k, b) if kernel is None else (kernel @ k, bias @ k + b)
    return kernel, bias


def test_a_deep_chain_folds_into_one_correctly_rounded_layer():
    model = _dense_chain(48)
    folded, report = ls.fold(model, nonnegative_inputs=True, policy="depth",
                             return_report=True)
    assert report.before.depth == 49 and report.after.depth == 1
    kernel, bias = _expected_dense(model)
    got_kernel, got_bias = folded.get_layer("out").get_weights()
    # rounded once from float64: at most one unit in the last place away
    np.testing.assert_array_max_ulp(got_kernel, kernel.astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(got_bias, bias.astype(np.float32), maxulp=1)
    assert _held_out_error(model, folded, (12,)) <= 1e-5


def _conv_chain(depth, channels=6, size=5, seed=0):
    """1x1 Conv-BN-ReLU blocks, then a 3x3 'same' conv: one conv and a
    bias map once folded."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels))
    h = inputs
    for i in range(depth):
        h = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="out")(h)
    model = keras.Model(inputs, h)
    make_identities(model, seed)
    return model


def test_dozens_of_convolutions_and_batchnorms_fold_into_one_within_1e_5():
    model = _conv_chain(36)
    folded, report = ls.fold(model, nonnegative_inputs=True, policy="depth",
                             return_report=True)
    assert report.after.depth == 1 and report.routes == {"out": "exact, bias map"}
    assert report.max_relative_error <= 1e-5
    assert _held_out_error(model, folded, (5, 5, 6)) <= 1e-5


def _densenet_like(blocks=4, growth=8, size=8, seed=0):
    """DenseNet's pattern at a small size: BN-ReLU-1x1-BN-ReLU-3x3 'same'
    blocks whose outputs are concatenated, and a transition; every ReLU
    an identity, so each 1x1 merges into its 3x3 with a bias map."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(2 * growth, 3, padding="same", use_bias=False, name="stem")(inputs)
    for stage in range(2):
        for block in range(blocks):
            name = f"s{stage}b{block}"
            y = keras.layers.BatchNormalization(name=f"{name}_bn0")(h)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(4 * growth, 1, use_bias=False, name=f"{name}_1x1")(y)
            y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(growth, 3, padding="same", use_bias=False,
                                    name=f"{name}_3x3")(y)
            h = keras.layers.Concatenate(name=f"{name}_concat")([h, y])
        if stage == 0:
            h = keras.layers.BatchNormalization(name="transition_bn")(h)
            h = keras.layers.ReLU()(h)
            h = keras.layers.Conv2D(2 * growth, 1, use_bias=False, name="transition")(h)
            h = keras.layers.AveragePooling2D(2, name="transition_pool")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    make_identities(model, seed)
    return model


def test_densenet_pattern_folds_within_1e_5_on_held_out_inputs():
    model = _densenet_like()
    folded, report = ls.fold(model, nonnegative_inputs=True, return_report=True)
    assert sum(route == "exact, bias map" for route in report.routes.values()) == 8
    assert report.after.depth < report.before.depth
    assert _held_out_error(model, folded, (8, 8, 3)) <= 1e-5


def test_probe_batches_cover_the_inputs_real_range():
    pixels = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 127.5, offset=-1),
                               keras.layers.Dense(2)])
    assert [tuple(np.round(r, 6)) for r in input_ranges(pixels)] == [(0.0, 255.0)]
    batches = probe_batches(pixels, nonnegative_inputs=True)
    assert len(batches) == 3 and all(b.shape == (4, 4) for b in batches)
    assert batches[2].max() > 100 and batches[2].min() >= 0
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert input_ranges(plain) == [None]
    # a caller's batch comes first, and the last draw follows its range
    data = np.linspace(-50.0, 50.0, 20, dtype="float32").reshape(5, 4)
    batches = probe_batches(plain, data=data)
    assert np.array_equal(batches[0], data)
    assert [b.shape for b in batches] == [(5, 4)] + [(4, 4)] * 3
    assert batches[-1].min() >= -50 and batches[-1].max() <= 50 and batches[-1].max() > 10


def test_each_probe_batch_is_judged_against_its_own_scale():
    # an error of 1e-3 on small outputs must not hide behind a batch of big ones
    expected = [np.concatenate([np.full((4, 2), 1000.0), np.ones((4, 2))])]
    actual = [expected[0] + np.concatenate([np.zeros((4, 2)), np.full((4, 2), 1e-3)])]
    rows = [slice(0, 4), slice(4, 8)]
    assert _errors(expected, actual, ["o"])["o"][1] == pytest.approx(1e-6)
    assert _errors(expected, actual, ["o"], rows)["o"][1] == pytest.approx(1e-3)


def test_verify_batch_is_checked_with_draws_in_its_range():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(1)])
    model.layers[0].set_weights([np.abs(w) for w in model.layers[0].get_weights()])
    x = np.random.default_rng(0).uniform(0, 200, (6, 3)).astype("float32")
    folded, report = ls.fold(model, nonnegative_inputs=True, verify=x, return_report=True)
    assert report.after.depth == 1 and report.max_relative_error <= 1e-5
