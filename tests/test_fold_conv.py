import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tf_layersparse as ls

from helpers import to_numpy


def _nonneg(layer):
    layer.set_weights([np.abs(w) for w in layer.get_weights()])


@st.composite
def conv_chains(draw):
    rank = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(2, 4))
    specs = [
        dict(
            kernel=draw(st.integers(1, 3)),
            stride=draw(st.integers(1, 2)),
            dilation=draw(st.integers(1, 2)),
            filters=draw(st.integers(1, 4)),
            inactive=draw(st.booleans()),
            bn=draw(st.booleans()),
        )
        for _ in range(n)
    ]
    for s in specs:  # Keras refuses strides > 1 together with dilation > 1
        if s["stride"] > 1:
            s["dilation"] = 1
    return rank, specs, draw(st.integers(0, 2**16))


def _conv_model(rank, specs, seed):
    keras.utils.set_random_seed(seed)
    conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[rank]
    inputs = keras.Input((48,) * rank + (2,))  # large enough for 4 strided layers
    h, layers, bns = inputs, [], []
    for i, s in enumerate(specs):
        layer = conv(s["filters"], s["kernel"], strides=s["stride"],
                     dilation_rate=s["dilation"], name=f"c{i}",
                     activation=None if s["bn"] else "relu")
        h = layer(h)
        if s["bn"]:
            bn = keras.layers.BatchNormalization(name=f"bn{i}")
            h = keras.layers.ReLU()(bn(h))
            bns.append((bn, s["inactive"]))
        layers.append((layer, s["inactive"]))
    outputs = conv(2, 1, name="out")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer, inactive in layers:
        if inactive:
            _nonneg(layer)
        else:
            w = layer.get_weights()
            w[0].flat[0] = -abs(w[0].flat[0]) - 1.0
            layer.set_weights(w)
    for bn, inactive in bns:
        c = bn.moving_mean.shape[0]
        gamma = rng.uniform(0.5, 1.5, c)
        beta = rng.uniform(0.0, 1.0, c) if inactive else rng.uniform(-1, 1, c)
        mean = -rng.uniform(0.0, 1.0, c) if inactive else rng.normal(size=c)
        bn.set_weights([gamma, beta, mean, rng.uniform(0.5, 2.0, c)])
    return model, layers


@given(conv_chains())
def test_valid_conv_chains_fold_exactly(case):
    rank, specs, seed = case
    model, layers = _conv_model(rank, specs, seed)
    folded, report = ls.fold(model, policy="depth", verify="random", return_report=True)
    # every inactive conv after the first merges (valid padding, BN folded first)
    expected = len(specs) + 1 - sum(inactive for _, inactive in layers[1:])
    assert report.after.depth == expected
    assert report.exact and report.max_relative_error <= 1e-5
    assert folded.output.shape == model.output.shape
    # each BatchNormalization directly follows a linear conv, so all fold away
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)


def test_merged_kernel_size_and_stride_follow_the_formula():
    inputs = keras.Input((30, 3))
    h = keras.layers.Conv1D(4, 3, strides=2, activation="relu", name="a")(inputs)
    h = keras.layers.Conv1D(4, 3, strides=3, activation="relu", name="b")(h)
    h = keras.layers.Conv1D(2, 2, name="c")(h)
    model = keras.Model(inputs, h)
    _nonneg(model.get_layer("b"))
    folded = ls.fold(model, policy="depth", verify="random", tolerance=1e-5)
    merged = folded.get_layer("c")
    # b (k=3, s=3) then c (k=2): k_b + (k_c - 1) * s_b = 3 + 1 * 3 = 6, stride 3
    assert merged.kernel_size == (6,) and merged.strides == (3,)


def test_same_padding_needs_an_explicit_choice_and_reports_its_error():
    inputs = keras.Input((10, 10, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="s1")(h)
    h = keras.layers.Conv2D(3, 3, padding="same", name="s2")(h)
    model = keras.Model(inputs, h)
    _nonneg(model.get_layer("s1"))
    exact, report = ls.fold(model, policy="depth", return_report=True)
    assert report.after.depth == 3 and report.exact
    assert "approximate=True" in report.skipped[0][2]
    approx, report = ls.fold(model, policy="depth", approximate=True, return_report=True)
    assert report.after.depth == 2 and not report.exact
    assert report.approximate == ["s2"] and report.verification["s2"][0] > 0
    # the interior, away from the borders, is exact
    x = np.random.default_rng(0).normal(size=(4, 10, 10, 2)).astype("float32")
    inner = (slice(None), slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(to_numpy(approx(x))[inner], to_numpy(model(x))[inner],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tolerance"):
        ls.fold(model, policy="depth", approximate=True, tolerance=1e-5)


def test_pointwise_convs_merge_with_same_padding_and_dense_on_channels():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(6, 3, padding="same", strides=2, activation="relu", name="k")(h)
    h = keras.layers.Conv2D(5, 1, activation="relu", name="p")(h)
    h = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, h)
    _nonneg(model.get_layer("k"))
    _nonneg(model.get_layer("p"))
    folded, report = ls.fold(model, policy="depth", verify="random", tolerance=1e-5, return_report=True)
    assert report.merges == [("head", ["k", "p", "head"])]
    assert isinstance(folded.get_layer("head"), keras.layers.Conv2D)


def test_conv_bn_relu_block_is_judged_on_effective_weights():
    inputs = keras.Input((9, 9, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    conv = keras.layers.Conv2D(3, 3, name="conv")
    bn = keras.layers.BatchNormalization(name="bn")
    h = keras.layers.ReLU()(bn(conv(h)))
    h = keras.layers.Conv2D(2, 3, name="out")(h)
    model = keras.Model(inputs, h)
    _nonneg(conv)
    bn.set_weights([np.full(3, -1.0), np.zeros(3), np.zeros(3), np.ones(3)])  # gamma < 0
    report = {s.name: s for s in ls.layer_report(model)}
    assert report["conv"].active and report["bn"].action == "removed"
    bn.set_weights([np.full(3, 2.0), np.ones(3), np.zeros(3), np.ones(3)])
    folded, rep = ls.fold(model, policy="depth", verify="random", tolerance=1e-5, return_report=True)
    assert rep.merges == [("out", ["conv", "out"])]
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    block = ls.eligible_layers(model)[1]
    assert block.eligible and (block.batchnorm, block.activation) == ("bn", "re_lu")


def test_classic_mnist_convnet_drops_relu_and_reports_pooling():
    model = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Conv2D(8, 3, activation="relu", name="c2"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax")])
    _nonneg(model.get_layer("c2"))
    folded, report = ls.fold(model, policy="depth", nonnegative_inputs=True, verify="random",
                             tolerance=1e-5, return_report=True)
    status = {s.name: s for s in report.layers}
    assert status["c2"].action == "removed-activation"
    assert folded.get_layer("c2").get_config()["activation"] == "linear"
    assert "Dropout" not in [type(l).__name__ for l in folded.layers]


def test_grouped_and_depthwise_convolutions_fold_exactly():
    inputs = keras.Input((8, 8, 4))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(h)
    h = keras.layers.Conv2D(4, 1, groups=2, activation="relu", name="g")(h)
    h = keras.layers.Conv2D(2, 1, name="out")(h)
    model = keras.Model(inputs, h)
    _nonneg(model.get_layer("dw"))
    _nonneg(model.get_layer("g"))
    folded, report = ls.fold(model, policy="depth", tolerance=1e-5, return_report=True)
    assert report.merges == [("out", ["dw", "g", "out"])]
    assert not report.reverted and report.max_relative_error <= 1e-5
    # depthwise followed by per-position maps stays separable: no cost growth
    assert isinstance(folded.get_layer("out"), keras.layers.SeparableConv2D)
    assert report.after.flops <= report.before.flops


def test_apply_layer_sparsity_penalises_convolutions_and_trains():
    base = keras.Sequential([
        keras.Input((10, 10, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Conv2D(4, 3, activation="relu", name="c2"),
        keras.layers.Flatten(), keras.layers.Dense(1)])
    model, report = ls.apply_layer_sparsity(base, 0.5, return_report=True)
    assert [e.eligible for e in report] == [False, True, False]
    assert isinstance(model.get_layer("c2").bias_regularizer, ls.LayerSparsity)
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    x = np.random.default_rng(0).normal(size=(32, 10, 10, 1)).astype("float32")
    model.fit(x, x[:, :1, 0, 0], epochs=2, verbose=0, callbacks=[ls.ActiveLayers()])
    assert set(ls.negative_part_norms(model)) == {"c2"}


def _compose_by_taps(k1, k2, s1, d1, d2):
    """Reference: every pair of taps, one product each."""
    import itertools

    rank = k1.ndim - 2
    size = tuple((k2.shape[a] - 1) * d2[a] * s1[a] + (k1.shape[a] - 1) * d1[a] + 1
                 for a in range(rank))
    out = np.zeros(size + (k1.shape[-2], k2.shape[-1]))
    for j in itertools.product(*(range(n) for n in k2.shape[:rank])):
        for i in itertools.product(*(range(n) for n in k1.shape[:rank])):
            out[tuple(j[a] * d2[a] * s1[a] + i[a] * d1[a] for a in range(rank))] += k1[i] @ k2[j]
    return out


@pytest.mark.parametrize("k1, k2, s1, d1, d2", [
    ((3, 3, 4, 5), (3, 3, 5, 6), (1, 1), (1, 1), (1, 1)),
    ((3, 2, 4, 5), (2, 3, 5, 6), (2, 1), (1, 2), (2, 1)),
    ((3, 4, 5), (5, 5, 2), (3,), (2,), (1,)),
])
def test_composed_kernels_match_the_tap_by_tap_sum(k1, k2, s1, d1, d2):
    from tf_layersparse.folding.merge import _compose_kernels

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=k1), rng.normal(size=k2)
    np.testing.assert_array_equal(_compose_kernels(a, b, s1, d1, d2),
                                  _compose_by_taps(a, b, s1, d1, d2))


def test_cost_policy_composes_no_kernel_of_a_separable_pair_it_refuses(monkeypatch):
    from tf_layersparse.folding import merge

    inputs = keras.Input((12, 12, 16))
    h = keras.layers.SeparableConv2D(16, 5, padding="valid", activation="relu", name="a")(inputs)
    h = keras.layers.SeparableConv2D(16, 5, padding="valid", name="b")(h)
    model = keras.Model(inputs, h)
    _nonneg(model.get_layer("a"))
    calls = []
    original = merge._compose_kernels
    monkeypatch.setattr(merge, "_compose_kernels",
                        lambda *args: calls.append(1) or original(*args))
    _, report = ls.fold(model, nonnegative_inputs=True, return_report=True)
    assert not report.merges and "cost policy" in report.skipped[0][2] and not calls
    _, report = ls.fold(model, nonnegative_inputs=True, policy="depth", return_report=True)
    assert report.merges == [("b", ["a", "b"])] and calls
