"""Fold the models a new user would try, and check it as they would.

The zoo (`tests/zoo.py`): keras.applications convnets with
weights=None at their smallest inputs, LSTM/GRU behind `Masking`, and small
Functional graphs with raw `keras.ops`, a custom layer without
`compute_output_shape`, `Lambda`, `TimeDistributed`, an adapted
`Normalization`, bicubic/lanczos upsampling before a ReLU, and
BatchNormalization on an axis that is not the conv's channels.

For each model, with random weights and with weights that make every ReLU an
identity (so merges happen): `fold` must not raise, must reproduce the
original outputs within max relative error 1e-5 (NaN fails), must leave the
original model untouched, and by default must not add FLOPs or parameters.

CI folds the fast entries; set TF_LAYERSPARSE_FULL_ZOO=1 for all ten
applications (several minutes).
"""

import json
import os

import keras
import numpy as np
import pytest
import zoo
from helpers import stored_params

import tf_layersparse as ls

TOLERANCE = 1e-5
FULL = os.environ.get("TF_LAYERSPARSE_FULL_ZOO", "") not in ("", "0")


def _cases(names, xfail=None):
    cases = []
    for name in names:
        marks = []
        if xfail and name in xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=xfail[name]))
        if not zoo.ZOO[name].fast and not FULL:
            marks.append(pytest.mark.skip(reason="slow; set TF_LAYERSPARSE_FULL_ZOO=1"))
        if not zoo.available(name):
            marks.append(pytest.mark.skip(
                reason=f"{name} does not run on {keras.backend.backend()} (CPU)"))
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


ALL = _cases(zoo.ZOO)
DROPS = _cases([name for name, entry in zoo.ZOO.items() if entry.depth_drops])


def _without_bytecode(config):
    """The config minus Lambda bytecode, whose marshal bytes change with
    reference counts; the function object itself is compared by identity."""
    if isinstance(config, dict):
        if config.get("class_name") == "__lambda__":
            return "<lambda>"
        return {k: _without_bytecode(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_without_bytecode(v) for v in config]
    return config


def _snapshot(model, x, xla=False):
    return dict(
        config=json.dumps(_without_bytecode(model.get_config()), default=str, sort_keys=True),
        functions=[id(layer.function) for layer in model.layers
                   if isinstance(layer, keras.layers.Lambda)],
        layers=[id(layer) for layer in model.layers],
        weights=[np.array(w, copy=True) for w in model.get_weights()],
        outputs=zoo.predict(model, x, xla),
    )


def _assert_unchanged(model, before, x, xla=False):
    after = _snapshot(model, x, xla)
    assert after["config"] == before["config"], "fold changed the original's config"
    assert after["layers"] == before["layers"], "fold changed the original's layers"
    assert after["functions"] == before["functions"], "fold replaced a Lambda's function"
    assert len(after["weights"]) == len(before["weights"])
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b, err_msg="fold changed the original's weights")
    for a, b in zip(before["outputs"], after["outputs"]):
        np.testing.assert_array_equal(a, b, err_msg="fold changed the original's outputs")


def _assert_exact(model, folded, x, xla=False):
    error = zoo.relative_error(model, folded, x, xla)
    assert error <= TOLERANCE, f"folded '{model.name}' off by max relative error {error:.3g}"


def _assert_not_costlier(model, folded, x):
    before, after = ls.model_cost(model), ls.model_cost(folded)
    assert after.params <= before.params, f"params grew: {before} -> {after}"
    assert after.flops <= before.flops, f"FLOPs grew: {before} -> {after}"
    assert stored_params(folded) <= model.count_params()
    # The backend's own count (TF profiler / XLA) does not trust model_cost's
    # list of layer types: a kind of layer it forgets still shows up here.
    flops = zoo.backend_flops(model, x[:1]), zoo.backend_flops(folded, x[:1])
    if None not in flops:
        assert flops[1] <= flops[0], f"backend FLOPs grew: {flops[0]:,} -> {flops[1]:,}"


@pytest.mark.parametrize("variant", ["random", "identities"])
@pytest.mark.parametrize("name", ALL)
def test_default_fold_is_exact_untouched_and_not_costlier(name, variant):
    model, xla = zoo.build(name, variant), zoo.ZOO[name].xla
    x = zoo.inputs_for(name, variant, 8, seed=1)
    before = _snapshot(model, x, xla)
    folded = ls.fold(model, nonnegative_inputs=variant == "identities")
    assert isinstance(folded, keras.Model) and folded is not model
    _assert_exact(model, folded, x, xla)
    _assert_unchanged(model, before, x, xla)
    _assert_not_costlier(model, folded, x)


@pytest.mark.parametrize("name", DROPS)
def test_depth_policy_merges_identities_exactly(name):
    model, xla = zoo.build(name, "identities"), zoo.ZOO[name].xla
    x = zoo.inputs_for(name, "identities", 8, seed=1)
    before = _snapshot(model, x, xla)
    folded = ls.fold(model, nonnegative_inputs=True, policy="depth")
    _assert_exact(model, folded, x, xla)
    _assert_unchanged(model, before, x, xla)
    depth = ls.model_cost(model).depth, ls.model_cost(folded).depth
    assert depth[1] < depth[0], f"no affine layer merged: depth {depth[0]} -> {depth[1]}"


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos3"])
def test_overshooting_upsampling_keeps_the_relu(interpolation):
    """Bicubic/lanczos interpolation of a >= 0 map can dip below 0: the ReLU
    after it is no identity, and the folded model must still apply it."""
    name = f"upsampling_{interpolation}"
    if not zoo.available(name):
        pytest.skip(f"{name} does not run on {keras.backend.backend()}")
    model = zoo.build(name, "random")
    x = zoo.inputs_for(name, "random", 8, seed=1)
    up = model.get_layer("up")(model.get_layer("c0")(x))
    assert float(keras.ops.min(up)) < 0, "test premise: the upsampled map goes negative"
    folded = ls.fold(model, policy="depth")
    _assert_exact(model, folded, x)


def test_adapted_normalization_statistics_survive():
    model = zoo.build("normalization", "random")
    mean = keras.ops.convert_to_numpy(model.get_layer("norm").mean)
    assert np.abs(mean).max() > 1, "test premise: adapt() gave non-trivial statistics"
    x = zoo.inputs_for("normalization", "random", 8, seed=1)
    _assert_exact(model, ls.fold(model), x)


def test_stateful_custom_layer_is_carried_with_its_weights():
    model = zoo.build("custom_layer", "identities")
    model.get_layer("scale").set_weights([np.linspace(0.1, 3.0, 16).astype("float32")])
    x = zoo.inputs_for("custom_layer", "identities", 8, seed=1)
    folded = ls.fold(model, nonnegative_inputs=True)
    _assert_exact(model, folded, x)


def test_zoo_entries_build_and_run():
    """Every small zoo graph gives a model whose outputs are finite and vary
    with the input (so an exactness check on it can fail)."""
    for name in zoo.ZOO:
        if name in zoo.APPLICATIONS or not zoo.available(name):
            continue
        for variant in ("random", "identities"):
            model = zoo.build(name, variant)
            x = zoo.inputs_for(name, variant, 4, seed=1)
            (y,) = zoo.predict(model, x, zoo.ZOO[name].xla)
            assert np.all(np.isfinite(y)), (name, variant)
            assert np.std(y, axis=0).max() > 0, (name, variant)
