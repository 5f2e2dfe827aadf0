"""Conv -> BatchNormalization -> ReLU blocks (issue 11) and the merges that
make real nets cheaper (issue 12): depthwise, inverted residual, RepVGG."""

import keras
import numpy as np

import tf_layersparse as ls
from helpers import assert_folds_exactly, make_nonnegative, set_batchnorm


def _block(h, filters, name, kernel=3, padding="valid", depthwise=False):
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel, padding=padding, use_bias=False, name=name)
    else:
        conv = keras.layers.Conv2D(filters, kernel, padding=padding, use_bias=False, name=name)
    h = keras.layers.BatchNormalization(name=f"{name}_bn")(conv(h))
    return keras.layers.ReLU(name=f"{name}_relu")(h)


def _inactive_with_negative_gamma(model, name):
    """Effective kernel >= 0 although half the channels have gamma < 0:
    those channels get a non-positive raw kernel and a mean below beta."""
    conv = model.get_layer(name)
    kernel = np.abs(conv.get_weights()[0])
    c = kernel.shape[-1]
    gamma = np.where(np.arange(c) % 2 == 0, 1.5, -0.7)
    kernel = kernel * np.sign(gamma).reshape((1,) * (kernel.ndim - 1) + (c,))
    conv.set_weights([kernel])
    mean = np.where(gamma > 0, -0.3, 0.4)  # (0 - mean) * gamma > 0
    set_batchnorm(model.get_layer(f"{name}_bn"), gamma, 0.2, mean, 2.0)


def _three_blocks_middle_inactive():
    """c1 -> c2 -> c3 Conv-BN-ReLU blocks; c2 inactive with negative gammas."""
    inputs = keras.Input((12, 12, 2))
    h = _block(inputs, 4, "c1")
    h = _block(h, 4, "c2")
    h = _block(h, 3, "c3")
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="head")(h))
    _inactive_with_negative_gamma(model, "c2")
    return model


def test_conv_bn_relu_blocks_with_negative_gamma_fold_exactly():
    model = _three_blocks_middle_inactive()
    report = {s.name: s for s in ls.layer_report(model)}
    assert not report["c2"].active and report["c2"].block == ("c2", "c2_bn", "c2_relu")
    assert "c2 + c2_bn + c2_relu" in report["c2"].reason
    assert report["c2_relu"].action == "removed"
    # the raw kernel alone has negative entries: only the block view is right
    assert model.get_layer("c2").get_weights()[0].min() < 0
    folded, fold_report = assert_folds_exactly(model, policy="depth")
    # c2 merges into the next block, itself a Conv -> BN block
    assert fold_report.merges == [("c3", ["c2", "c3"])]
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    eligible = {e.name: e for e in ls.eligible_layers(model)}
    assert eligible["c2"].eligible and eligible["c2"].batchnorm == "c2_bn"


def test_active_block_keeps_its_relu():
    inputs = keras.Input((8, 8, 2))
    h = _block(_block(inputs, 3, "c1"), 3, "c2")
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(h))
    make_nonnegative(model.get_layer("c2"))
    set_batchnorm(model.get_layer("c2_bn"), [1.0, -1.0, 1.0], 0.0)  # one flipped channel
    report = {s.name: s for s in ls.layer_report(model)}
    assert report["c2"].active and report["c2_relu"].action == "kept"
    assert_folds_exactly(model, policy="depth")


def test_depthwise_block_then_pointwise_becomes_one_separable_conv():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 1, activation="relu")(inputs)
    h = _block(h, None, "dw", padding="same", depthwise=True)
    h = keras.layers.Conv2D(5, 1, name="pw")(h)
    model = keras.Model(inputs, h)
    make_nonnegative(model.get_layer("dw"))
    set_batchnorm(model.get_layer("dw_bn"), 1.3, 0.1, -0.2, 0.5)
    folded, report = assert_folds_exactly(model)  # default cost policy
    assert report.merges == [("pw", ["dw", "pw"])]
    assert isinstance(folded.get_layer("pw"), keras.layers.SeparableConv2D)
    assert report.after.flops < report.before.flops  # the BatchNorm is gone


def _inverted_residual(c=4, expand_bias=0.0):
    inputs = keras.Input((10, 10, c))
    x = keras.layers.ReLU()(inputs)
    h = _block(x, 6 * c, "expand", kernel=1)
    h = _block(h, None, "dw", padding="same", depthwise=True)
    h = keras.layers.Conv2D(c, 1, use_bias=False, name="project")(h)
    h = keras.layers.BatchNormalization(name="project_bn")(h)
    model = keras.Model(inputs, keras.layers.Add(name="add")([x, h]))
    for name in ("expand", "dw"):
        make_nonnegative(model.get_layer(name))
    # expand's effective bias is beta - mean * scale
    set_batchnorm(model.get_layer("expand_bn"), 1.0, expand_bias, 0.0, 1.0)
    set_batchnorm(model.get_layer("dw_bn"), 0.8, 0.3, -0.1, 1.5)
    set_batchnorm(model.get_layer("project_bn"), -0.5, 0.2, 0.1, 1.0)
    return model


def test_inverted_residual_becomes_one_cheap_conv_with_the_identity_inside():
    model = _inverted_residual()
    folded, report = assert_folds_exactly(model)  # default: cost policy
    assert report.merges == [("project", ["expand", "dw", "project", "add"])]
    conv = folded.get_layer("project")
    assert isinstance(conv, keras.layers.Conv2D) and conv.kernel.shape == (3, 3, 4, 4)
    assert report.after.flops < report.before.flops / 3
    assert report.after.params < report.before.params


def test_expand_bias_meeting_same_padding_merges_with_a_bias_map():
    # the depthwise 'same' padding shows 0 where the merged conv sees the
    # expand bias: a BiasMap after the merged conv carries the difference
    model = _inverted_residual(expand_bias=0.5)
    folded, report = assert_folds_exactly(model)
    assert report.merges == [("project", ["expand", "dw", "project", "add"])]
    assert report.routes == {"project": "exact, bias map"}
    assert any(isinstance(layer, ls.BiasMap) for layer in folded.layers)
    assert report.after.flops <= report.before.flops


def test_repvgg_add_of_a_conv_and_its_input_is_one_conv():
    inputs = keras.Input((7, 7, 3))
    x = keras.layers.ReLU()(inputs)
    h = keras.layers.Conv2D(3, 3, padding="same", name="branch")(x)
    model = keras.Model(inputs, keras.layers.Add(name="add")([h, x]))
    folded, report = assert_folds_exactly(model)
    assert report.merges == [("branch", ["branch", "add"])]
    assert [type(l).__name__ for l in folded.layers] == ["InputLayer", "ReLU", "Conv2D"]


def test_dense_bn_relu_block_folds_into_the_next_dense():
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(6, activation="relu"),
        keras.layers.Dense(6, name="d"), keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="act"), keras.layers.Dense(2, name="out")])
    make_nonnegative(model.get_layer("d"))
    set_batchnorm(model.get_layer("bn"), 2.0, 0.5, -1.0, 3.0)
    folded, report = assert_folds_exactly(model, policy="depth")
    assert report.merges == [("out", ["d", "out"])] and len(folded.layers) == 2


def _bn_names(model):
    return [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_keep_batchnorm_folds_only_the_merged_blocks():
    model = _three_blocks_middle_inactive()
    folded, report = assert_folds_exactly(model, policy="depth", keep_batchnorm=True)
    assert report.merges == [("c3", ["c2", "c3"])]
    # c2's BN went into the merged conv; the active blocks keep theirs
    assert _bn_names(folded) == ["c1_bn", "c3_bn"]
    assert _bn_names(ls.fold(model, policy="depth")) == []
