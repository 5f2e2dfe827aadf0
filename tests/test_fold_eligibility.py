"""`eligible_layers`: the contract with the training side (issue 11)."""

import keras

import tf_layersparse as ls


def _by_name(model, **kwargs):
    return {e.name: e for e in ls.eligible_layers(model, **kwargs)}


def test_conv_bn_relu_block_is_eligible_and_names_its_parts():
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, use_bias=False, name="c1"),
        keras.layers.BatchNormalization(name="bn1"), keras.layers.ReLU(name="a1"),
        keras.layers.Conv2D(4, 3, use_bias=False, name="c2"),
        keras.layers.BatchNormalization(name="bn2"), keras.layers.ReLU(name="a2"),
        keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
    report = _by_name(model)
    assert not report["c1"].eligible and "input may be negative" in report["c1"].reason
    assert (report["c1"].batchnorm, report["c1"].activation) == ("bn1", "a1")
    assert report["c2"].eligible
    assert (report["c2"].batchnorm, report["c2"].activation) == ("bn2", "a2")
    assert report["out"].activation is None and report["out"].batchnorm is None
    assert _by_name(model, nonnegative_inputs=True)["c1"].eligible


def test_inline_activation_names_the_layer_itself():
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="a"),
        keras.layers.Dense(4, activation="relu", name="b"), keras.layers.Dense(1)])
    entry = _by_name(model)["b"]
    assert entry.eligible and entry.activation == "b" and entry.batchnorm is None


def test_depthwise_and_separable_blocks_are_eligible():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 1, activation="relu")(inputs)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="act")(h)
    h = keras.layers.SeparableConv2D(4, 3, activation="relu", name="sep")(h)
    h = keras.layers.Conv2D(2, 1, name="out")(h)
    report = _by_name(keras.Model(inputs, h))
    assert report["dw"].eligible and report["dw"].batchnorm == "bn"
    assert report["dw"].class_name == "DepthwiseConv2D"
    assert report["sep"].eligible and report["sep"].activation == "sep"


def test_capped_relu_is_not_eligible_and_says_why():
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
        keras.layers.Dense(4, name="d"), keras.layers.ReLU(max_value=6.0),
        keras.layers.Dense(4, activation="relu6", name="e"), keras.layers.Dense(1)])
    report = _by_name(model)
    for name in ("d", "e"):
        assert not report[name].eligible
        assert "capped" in report[name].reason and "[0, cap]" in report[name].reason


def test_batchnorm_off_the_channel_axis_blocks_eligibility():
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 1, activation="relu")(inputs)
    h = keras.layers.Conv2D(3, 1, name="c")(h)
    h = keras.layers.BatchNormalization(axis=1, name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(1, 1)(h)
    entry = _by_name(keras.Model(inputs, h))["c"]
    assert not entry.eligible and "channel axis" in entry.reason
