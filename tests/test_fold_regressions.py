"""One regression test per bug listed in issue 12, plus the self-check."""

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from helpers import assert_folds_exactly, make_nonnegative


def _relu_chain(inputs, h, names=("a", "b")):
    for name in names:
        h = keras.layers.Dense(4, activation="relu", name=name)(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


def test_raw_keras_ops_are_opaque_boundaries_not_crashes():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="relu")(inputs)
    h = h * 0.5 + keras.ops.abs(h)
    h = keras.layers.Dense(4, activation="relu", name="b")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    make_nonnegative(model.get_layer("b"))
    folded, report = assert_folds_exactly(model, policy="depth")
    status = {s.name: s for s in ls.layer_report(model)}
    assert "raw operation" in status["multiply"].reason
    # nothing proves the raw ops keep inputs >= 0, so "b" keeps its ReLU
    assert status["b"].action == "kept" and "input may be negative" in status["b"].reason


def test_custom_layer_without_compute_output_shape_in_sequential():
    class Halve(keras.layers.Layer):
        def call(self, x):
            return x[..., :2]

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(4, activation="relu", name="b"), Halve(),
                              keras.layers.Dense(3, activation="relu", name="c"),
                              keras.layers.Dense(1)])
    make_nonnegative(model.get_layer("b"))
    folded, report = assert_folds_exactly(model, policy="depth")
    assert {s.name: s.action for s in report.layers}["b"] == "removed-activation"


def test_adapted_normalization_keeps_its_statistics():
    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(0).uniform(0, 5, (50, 3)))
    inputs = keras.Input((3,))
    model = _relu_chain(inputs, norm(inputs))
    make_nonnegative(model.get_layer("b"))
    folded, report = assert_folds_exactly(model, policy="depth")
    assert report.merges == [("out", ["b", "out"])] and not report.reverted


def test_bicubic_upsampling_does_not_keep_nonnegativity():
    inputs = keras.Input((4, 4, 1))
    h = keras.layers.Conv2D(2, 1, activation="relu")(inputs)
    h = keras.layers.UpSampling2D(interpolation="bicubic", name="up")(h)
    h = keras.layers.Conv2D(2, 1, activation="relu", name="c")(h)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(h))
    make_nonnegative(model.get_layer("c"))
    folded, report = assert_folds_exactly(model, policy="depth")
    status = {s.name: s for s in report.layers}
    assert status["c"].action == "kept" and "input may be negative" in status["c"].reason
    assert "bicubic" in status["up"].reason
    # nearest and bilinear upsampling do keep inputs >= 0
    assert ls.registry.rule_for(keras.layers.UpSampling2D(interpolation="bilinear")).kind == (
        "passthrough")


def test_batchnorm_on_the_wrong_axis_of_a_channels_first_conv_is_not_folded():
    def model_with(axis):
        inputs = keras.Input((2, 6, 6))
        h = keras.layers.Conv2D(3, 3, data_format="channels_first", name="c")(inputs)
        h = keras.layers.BatchNormalization(axis=axis, name="bn")(h)
        return keras.Model(inputs, keras.layers.Flatten()(h))

    wrong = {s.name: s for s in ls.layer_report(model_with(-1))}
    assert wrong["bn"].action == "kept"
    right = {s.name: s for s in ls.layer_report(model_with(1))}
    assert right["bn"].action == "removed" and right["c"].block == ("c", "bn", None)
    # the self-check runs the channels_first model (compiled on TensorFlow CPU)
    for axis in (-1, 1):
        assert_folds_exactly(model_with(axis))


def test_nan_is_a_failure_not_a_pass():
    good = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    bad = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    bad.set_weights([np.full((2, 1), np.nan, "float32"), np.zeros(1, "float32")])
    abs_err, rel_err = ls.compare_outputs(good, bad, np.ones((3, 2), "float32"))["d"]
    assert abs_err == np.inf and rel_err == np.inf


def test_default_policy_never_grows_a_residual_net():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(16, 1, activation="relu")(inputs)
    for i in range(2):
        h = keras.layers.Conv2D(4, 1, activation="relu", name=f"r{i}a")(x)
        h = keras.layers.Conv2D(4, 3, padding="valid", activation="relu", name=f"r{i}b")(h)
        h = keras.layers.Conv2D(16, 1, name=f"r{i}c")(h)
        x = keras.layers.ReLU()(keras.layers.Add()([keras.layers.Cropping2D(1)(x), h]))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    for layer in model.layers:
        if layer.name.startswith("r"):
            make_nonnegative(layer)
    _, report = assert_folds_exactly(model, nonnegative_inputs=True)
    assert report.after.flops <= report.before.flops
    assert report.after.params <= report.before.params
    assert any("cost policy" in reason for _, _, reason in report.skipped)
    _, deep = assert_folds_exactly(model, nonnegative_inputs=True, policy="depth")
    assert deep.after.depth < report.after.depth and deep.after.flops > report.before.flops


def test_model_cost_counts_depthwise_separable_and_grouped_convolutions():
    model = keras.Sequential([
        keras.Input((8, 8, 4)),
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
        keras.layers.SeparableConv2D(8, 3, padding="same", use_bias=False),
        keras.layers.Conv2D(8, 3, padding="same", groups=4, use_bias=False)])
    positions = 64
    expected = 2 * positions * (9 * 4 + (9 * 4 + 4 * 8) + 9 * 2 * 8)
    assert ls.model_cost(model).flops == expected


def test_bias_before_same_padding_gets_the_right_reason():
    for size in (6, None):
        inputs = keras.Input((size, size, 2))
        h = keras.layers.Conv2D(3, 1, activation="relu")(inputs)
        h = keras.layers.Conv2D(3, 1, activation="relu", name="p", bias_initializer="ones")(h)
        model = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same", name="k")(h))
        make_nonnegative(model.get_layer("p"))
        _, report = assert_folds_exactly(model, policy="depth")
        if size is not None:  # merged exactly, with a bias map for the border
            assert report.routes == {"k": "exact, bias map"}
            continue
        assert report.skipped[0][:2] == ("p", "k") and "bias" in report.skipped[0][2]
        assert "known spatial size" in report.skipped[0][2]
        assert "padding '" not in report.skipped[0][2]


def test_self_check_reverts_a_wrong_rule_and_says_so():
    class Shift(keras.layers.Layer):  # claims to keep inputs >= 0, does not
        def call(self, x):
            return x - 1.0

    ls.folding.register(Shift, ls.folding.Rule("passthrough"))
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="relu")(inputs)
    h = Shift(name="shift")(h)
    model = _relu_chain(inputs, h, names=("b",))
    make_nonnegative(model.get_layer("b"))
    folded, report = assert_folds_exactly(model, policy="depth")
    assert ("activation", "b") in report.reverted
    assert "reverted" in {s.name: s for s in report.layers}["b"].reason
    assert "reverted by the self-check" in str(report)


def test_verify_false_opts_out_and_verify_data_is_used():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu"),
                              keras.layers.Dense(1)])
    _, report = ls.fold(model, verify=False, return_report=True)
    assert report.verification is None
    x = np.ones((5, 3), "float32")
    _, report = ls.fold(model, verify=x, return_report=True)
    assert report.max_relative_error <= 1e-5


def test_lstm_with_masking_and_embedding_inputs_fold():
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 4, mask_zero=True)(tokens)
    h = keras.layers.LSTM(5)(h)
    h = keras.layers.Dense(4, activation="relu", name="a")(h)
    h = keras.layers.Dense(4, activation="relu", name="b")(h)
    model = keras.Model(tokens, keras.layers.Dense(1, name="out")(h))
    make_nonnegative(model.get_layer("b"))
    _, report = assert_folds_exactly(model, policy="depth")
    assert report.merges == [("out", ["b", "out"])]
    series = keras.Input((7, 3))
    h = keras.layers.Masking(0.0)(series)
    h = keras.layers.GRU(4)(h)
    assert_folds_exactly(_relu_chain(series, h))


def test_nested_model_lambda_and_time_distributed_are_carried_over():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="relu")])
    inputs = keras.Input((5, 3))
    h = keras.layers.TimeDistributed(keras.layers.Dense(3))(inputs)
    h = keras.layers.Lambda(lambda t: t * 2.0)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = inner(h)
    model = _relu_chain(inputs, h)
    assert_folds_exactly(model)


def test_shapes_come_from_symbolic_inference():
    from tf_layersparse.graph import model_graph

    class NoShape(keras.layers.Layer):
        def call(self, x):
            return keras.ops.concatenate([x, x], axis=-1)

    model = keras.Sequential([keras.Input((3,)), NoShape(), keras.layers.Dense(2)])
    assert [n.shapes[0] for n in model_graph(model).nodes] == [(None, 6), (None, 2)]
    with pytest.raises(TypeError, match="subclassed"):
        model_graph(type("Sub", (keras.Model,), {"call": lambda self, x: x})())


def test_folded_layers_keep_the_original_initializers():
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="a",
                                              kernel_initializer="he_normal"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="out")])
    folded = ls.fold(model, policy="depth")
    for layer in folded.layers:
        for key, value in layer.get_config().items():
            if key.endswith("_initializer"):
                assert value["class_name"] != "Zeros" or key in (
                    "bias_initializer", "beta_initializer", "moving_mean_initializer"), (
                    layer.name, key)
    assert folded.get_layer("a").get_config()["kernel_initializer"]["class_name"] == "HeNormal"


def test_unreadable_models_get_clear_errors():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        ls.fold(Net())
    with pytest.raises(ValueError, match="no defined input"):
        ls.fold(keras.Sequential([keras.layers.Dense(2)]))


def test_channels_first_conv_flatten_dense_merges_exactly():
    for flatten_format in ("channels_first", "channels_last"):
        inputs = keras.Input((2, 9, 8))
        h = keras.layers.Conv2D(3, 1, data_format="channels_first", activation="relu")(inputs)
        h = keras.layers.Conv2D(4, 3, strides=(2, 1), padding="same", activation="relu",
                                data_format="channels_first", name="c2")(h)
        h = keras.layers.Flatten(data_format=flatten_format)(h)
        model = keras.Model(inputs, keras.layers.Dense(3, name="d")(h))
        layer = model.get_layer("c2")
        layer.set_weights([np.abs(w) + 0.01 for w in layer.get_weights()])
        _, report = assert_folds_exactly(model, policy="depth")
        assert report.merges == [("d", ["c2", "d"])] and not report.reverted
