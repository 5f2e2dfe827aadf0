import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import to_numpy
from tf_layersparse import (
    LayerSparsity,
    layer_sparsity_prox,
    negative_part_norm,
    snap_negative_part,
)

arrays = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    elements=st.floats(-10, 10, allow_nan=False, width=32),
)


# JAX computes in float32 unless x64 is enabled: float64 checks get float32 tolerances there
TIGHT = 1e-6 if keras.backend.backend() == "jax" else 1e-12


def np_norm(w):
    return float(np.sqrt(np.sum(np.minimum(w, 0) ** 2)))


@given(arrays, st.floats(0, 5))
def test_penalty_matches_numpy(w, strength):
    value = float(LayerSparsity(strength)(keras.ops.convert_to_tensor(w, 'float64')))
    assert value == pytest.approx(strength * np_norm(w), rel=TIGHT, abs=TIGHT)


@pytest.mark.tf_only
@given(arrays)
def test_gradient_matches_numpy_and_is_finite(w):
    import tensorflow as tf

    x = tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = LayerSparsity(0.7)(x)
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad))
    norm = np_norm(w)
    expected = 0.7 * np.minimum(w, 0) / norm if norm > 0 else np.zeros_like(w)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.tf_only
def test_gradient_is_zero_not_nan_for_zero_bias():
    import tensorflow as tf

    bias = tf.Variable(tf.zeros(5))
    with tf.GradientTape() as tape:
        loss = LayerSparsity(1.0)(bias)
    grad = tape.gradient(loss, bias)
    assert np.array_equal(grad.numpy(), np.zeros(5))


def test_driven_penalty_adds_nothing_to_the_loss():
    # while ActiveLayers takes proximal steps, the penalty acts there only
    reg = LayerSparsity(0.5)
    w = keras.ops.convert_to_tensor([[-1.0, 2.0], [-3.0, 0.5]])
    assert float(reg(w)) == pytest.approx(0.5 * math.sqrt(10))
    reg._driven = True
    assert float(reg(w)) == 0.0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), -float("inf")])
@pytest.mark.backend_independent
def test_bad_strength_raises_value_error(bad):
    with pytest.raises(ValueError, match="strength"):
        LayerSparsity(bad)


@pytest.mark.backend_independent
def test_non_numeric_strength_raises_type_error():
    with pytest.raises(TypeError, match="strength"):
        LayerSparsity("strong")


@pytest.mark.backend_independent
def test_config_round_trip_and_keras_serialization():
    reg = LayerSparsity(0.25, proximal=True)
    again = LayerSparsity.from_config(reg.get_config())
    assert (again.strength, again.proximal) == (0.25, True)
    revived = keras.regularizers.deserialize(keras.regularizers.serialize(reg))
    assert isinstance(revived, LayerSparsity) and revived.strength == 0.25


def np_prox(w, t):
    neg = np.minimum(w, 0)
    norm = np.sqrt(np.sum(neg**2))
    scale = max(0.0, 1 - t / norm) if norm > 0 else 0.0
    return np.maximum(w, 0) + scale * neg


@given(arrays, st.floats(0, 20))
def test_prox_matches_closed_form(w, t):
    got = to_numpy(layer_sparsity_prox(keras.ops.convert_to_tensor(w), t))
    np.testing.assert_allclose(got, np_prox(w, t), rtol=TIGHT, atol=TIGHT * 10)
    # positive part untouched (up to float32 rounding and denormal flushing on JAX)
    np.testing.assert_allclose(got[w >= 0], w[w >= 0], rtol=TIGHT, atol=1e-30 if TIGHT < 1e-9 else 1e-37)


@given(arrays, st.floats(0.01, 5), st.integers(0, 2**31 - 1))
def test_prox_minimises_its_objective(w, t, seed):
    def objective(z):
        return 0.5 * np.sum((z - w) ** 2) + t * np_norm(z)

    p = to_numpy(layer_sparsity_prox(keras.ops.convert_to_tensor(w), t))
    rng = np.random.default_rng(seed)
    for _ in range(20):
        z = p + rng.normal(scale=0.1, size=w.shape)
        assert objective(p) <= objective(z) + 1e-9


def test_prox_gives_exact_zero_below_threshold():
    w = keras.ops.convert_to_tensor([0.3, -0.3, -0.4])  # negative-part norm 0.5
    out = to_numpy(layer_sparsity_prox(w, 0.5))
    assert out.tolist() == [pytest.approx(0.3), 0.0, 0.0]
    assert np.min(out) >= 0


def test_snap():
    w = keras.ops.convert_to_tensor([1.0, -1e-4, -1e-4])
    assert np.min(to_numpy(snap_negative_part(w, 1e-3))) == 0.0
    assert np.array_equal(to_numpy(snap_negative_part(w, 1e-5)), to_numpy(w))


def test_negative_part_norm():
    assert float(negative_part_norm([[3.0, -3.0], [-4.0, 1.0]])) == pytest.approx(5.0)
