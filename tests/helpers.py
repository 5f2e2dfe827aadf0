"""Shared test helpers: weights with known signs, a fold check, round trips."""

import os

import keras
import numpy as np
import pytest

import tf_layersparse as ls

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

# A long end-to-end run whose code paths other, shorter tests cover on every
# backend: CI runs the suite once per backend, and this one needs only one.
tensorflow_pass_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-agnostic end-to-end run; it runs once, in the suite's TensorFlow pass")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def to_numpy(x):
    """A backend tensor or Keras variable as a numpy array."""
    return keras.ops.convert_to_numpy(x)


def make_nonnegative(layer):
    """Give `layer` the absolute values of its weights (an inactive layer)."""
    layer.set_weights([np.abs(w) for w in layer.get_weights()])


def set_batchnorm(layer, gamma, beta, mean=0.0, var=1.0):
    """Set a BatchNormalization's gamma, beta and moving statistics."""
    c = layer.gamma.shape[0]
    layer.set_weights([np.broadcast_to(np.asarray(v, "float32"), (c,)).copy()
                       for v in (gamma, beta, mean, var)])


def assert_folds_exactly(model, tolerance=1e-5, **kwargs):
    """Fold `model`, check it against the original on fresh inputs (not the
    fold's own probe batch) and that the model was not modified."""
    before = [w.copy() for w in model.get_weights()]
    folded, report = ls.fold(model, return_report=True, **kwargs)
    x = ls.folding.probe_inputs(model, kwargs.get("nonnegative_inputs", False),
                                batch_size=16, seed=7)
    errors = ls.compare_outputs(model, folded, x)
    assert max(rel for _, rel in errors.values()) <= tolerance, errors
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    return folded, report


def saved_and_loaded(model, tmp_path):
    """`model` after a `.keras` round trip."""
    path = tmp_path / "model.keras"
    model.save(path)
    return keras.models.load_model(path)


def stored_params(model):
    """Keras' `count_params`, less the full maps that `BiasMap`s expand from
    their stored tables (derived: neither saved nor counted by model_cost)."""
    derived = sum(int(np.prod(layer.full_map.shape)) for layer in model.layers
                  if isinstance(layer, ls.BiasMap))
    return model.count_params() - derived
