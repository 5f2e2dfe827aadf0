import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tf_layersparse as ls

from helpers import to_numpy, weights_of


def _make_nonnegative(layer):
    layer.set_weights([np.abs(w) for w in layer.get_weights()])


@st.composite
def mlps(draw):
    """Random ReLU MLP, with the layers to make inactive and the expected depth."""
    depth = draw(st.integers(2, 7))  # hidden layers
    widths = draw(st.lists(st.integers(1, 8), min_size=depth, max_size=depth))
    inactive = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    separate = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    dropout = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    use_bias = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    functional = draw(st.booleans())
    nonneg_inputs = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return depth, widths, inactive, separate, dropout, use_bias, functional, nonneg_inputs, seed


def _build(depth, widths, inactive, separate, dropout, use_bias, functional, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), name="x")
    h, dense = inputs, []
    for i in range(depth):
        layer = keras.layers.Dense(
            widths[i], activation=None if separate[i] else "relu", use_bias=use_bias[i],
            bias_initializer=keras.initializers.RandomNormal(), name=f"d{i}")
        h = layer(h)
        if separate[i]:
            h = keras.layers.ReLU(name=f"relu{i}")(h)
        if dropout[i]:
            h = keras.layers.Dropout(0.3, name=f"drop{i}")(h)
        dense.append(layer)
    out_layer = keras.layers.Dense(2, name="out")
    outputs = out_layer(h)
    model = keras.Model(inputs, outputs) if functional else keras.Sequential(
        [inputs] + [l for l in _layers_in_order(inputs, outputs)])
    for layer, flag in zip(dense, inactive):
        if flag:
            _make_nonnegative(layer)
    # guarantee active layers really are active
    for layer, flag in zip(dense, inactive):
        if not flag:
            k = layer.get_weights()
            k[0].flat[0] = -abs(k[0].flat[0]) - 0.1
            layer.set_weights(k)
    return model


def _layers_in_order(inputs, outputs):
    return keras.Model(inputs, outputs).layers[1:]


def _expected_depth(depth, inactive, nonneg_inputs):
    merged = sum(
        1 for i in range(depth) if inactive[i] and (i > 0 or nonneg_inputs)
    )
    return depth + 1 - merged


@given(mlps())
def test_fold_is_exact_and_merges_what_the_construction_implies(case):
    depth, widths, inactive, separate, dropout, use_bias, functional, nonneg, seed = case
    model = _build(depth, widths, inactive, separate, dropout, use_bias, functional, seed)
    before = weights_of(model)
    folded, report = ls.fold(model, policy="depth", nonnegative_inputs=nonneg, verify="random",
                             return_report=True)
    assert report.after.depth == _expected_depth(depth, inactive, nonneg)
    assert report.max_relative_error <= 1e-5
    # on data well away from the random check's inputs too
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3.0, size=(50, 3)).astype("float32")
    if nonneg:
        x = np.abs(x)
    got, want = to_numpy(folded(x)), to_numpy(model(x))
    scale = np.max(np.abs(want))
    assert np.max(np.abs(got - want)) <= 1e-5 * max(scale, 1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model)))
    assert isinstance(folded, keras.Sequential) == isinstance(model, keras.Sequential)
    assert not any(isinstance(l, keras.layers.Dropout) for l in folded.layers)
    assert folded.inputs[0].shape == model.inputs[0].shape


def test_runs_of_inactive_layers_including_last_hidden_merge_into_output():
    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(6, activation="relu", name=f"h{i}") for i in range(5)
    ] + [keras.layers.Dense(1, name="out")])
    for layer in model.layers[1:5]:  # h1..h4: a run ending at the last hidden layer
        _make_nonnegative(layer)
    folded, report = ls.fold(model, policy="depth", verify="random", tolerance=1e-5, return_report=True)
    assert [l.name for l in folded.layers] == ["h0", "out"]
    assert report.merges == [("out", ["h1", "h2", "h3", "h4", "out"])]
    statuses = {s.name: s for s in report.layers}
    assert statuses["h2"].merged_into == "out" and statuses["h2"].foldable
    assert statuses["h0"].active and not statuses["h0"].foldable
    assert report.before.depth == 6 and report.after.depth == 2
    assert report.after.params == 4 * 6 + 6 + 6 * 1 + 1
    assert report.after.flops == 2 * (4 * 6 + 6 * 1)


def test_nonnegative_inputs_makes_first_layer_foldable():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(1)])
    _make_nonnegative(model.layers[0])
    assert ls.fold(model).layers[0].name == model.layers[0].name
    folded = ls.fold(model, nonnegative_inputs=True)
    assert len(folded.layers) == 1
    x = np.abs(np.random.default_rng(0).normal(size=(8, 4))).astype("float32")
    np.testing.assert_allclose(to_numpy(folded(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-6)


def test_nan_weights_name_the_layer():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="bad_one"),
                              keras.layers.Dense(1)])
    w = model.layers[0].get_weights()
    w[0][0, 0] = np.nan
    model.layers[0].set_weights(w)
    with pytest.raises(ValueError, match="bad_one"):
        ls.fold(model)


def test_unsupported_layer_is_kept_and_reported():
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
        keras.layers.Dense(5, activation="relu", name="inactive"),
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dense(5, activation="relu"), keras.layers.Dense(1)])
    _make_nonnegative(model.get_layer("inactive"))
    folded, report = ls.fold(model, policy="depth", verify="random", return_report=True)
    statuses = {s.name: s for s in report.layers}
    assert statuses["norm"].action == "kept" and "no rule" in statuses["norm"].reason
    assert statuses["inactive"].action == "removed-activation"
    assert "not an affine layer" in statuses["inactive"].reason
    assert "norm" in [l.name for l in folded.layers]
    assert report.max_relative_error <= 1e-5


def test_relu6_and_branches_stop_a_merge():
    inputs = keras.Input((3,))
    a = keras.layers.Dense(4, activation="relu", name="a")(inputs)
    b = keras.layers.Dense(4, activation="relu6", name="b")(a)
    c = keras.layers.Dense(4, activation="relu", name="c")(b)
    d1 = keras.layers.Dense(2, name="d1")(c)
    d2 = keras.layers.Dense(2, name="d2")(c)
    model = keras.Model(inputs, [d1, d2])
    for name in "bc":
        _make_nonnegative(model.get_layer(name))
    folded, report = ls.fold(model, policy="depth", verify="random", tolerance=1e-5, return_report=True)
    statuses = {s.name: s for s in report.layers}
    assert "capped" in statuses["b"].reason  # issue 12: not "relu not identity"
    assert "feeds 2 layers" in statuses["c"].reason
    assert report.after.depth == 5
    assert [t.name for t in folded.outputs] != [] and len(folded.outputs) == 2


def test_folded_model_saves_and_loads_without_the_penalty(tmp_path):
    base = keras.Sequential([keras.Input((3,))] + [
        keras.layers.Dense(4, activation="relu") for _ in range(3)] + [keras.layers.Dense(1)])
    model = ls.apply_layer_sparsity(base, 0.1)
    _make_nonnegative(model.layers[2])
    folded = ls.fold(model, policy="depth")
    assert not ls.regularized_layers(folded)
    folded.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(folded(x)))


def test_compare_outputs_and_tolerance_detect_differences():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="o")])
    other = keras.models.clone_model(model)
    other.set_weights([w + 1 for w in model.get_weights()])
    abs_err, rel_err = ls.compare_outputs(model, other, np.ones((3, 2), "float32"))["o"]
    assert abs_err == pytest.approx(3.0) and rel_err > 0.1


def test_policy_cost_skips_growing_merges():
    model = keras.Sequential([keras.Input((100,)), keras.layers.Dense(100, activation="relu"),
                              keras.layers.Dense(10, activation="relu", name="narrow"),
                              keras.layers.Dense(100, activation="relu", name="wide"),
                              keras.layers.Dense(1)])
    _make_nonnegative(model.get_layer("narrow"))
    depth_fold = ls.fold(model, policy="depth", return_report=True)[1]
    cost_fold = ls.fold(model, policy="cost", return_report=True)[1]
    assert depth_fold.after.depth == 3 and depth_fold.after.params > depth_fold.before.params
    assert cost_fold.after.depth == 4 and "cost policy" in cost_fold.skipped[0][2]
    assert cost_fold.after.params <= cost_fold.before.params
    with pytest.raises(ValueError, match="policy"):
        ls.fold(model, policy="fastest")


def test_layer_report_lists_every_layer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dropout(0.1), keras.layers.Dense(1)])
    report = ls.layer_report(model)
    assert [s.class_name for s in report] == ["Dense", "Dropout", "Dense"]
    assert "identity at inference" in str(report)
