"""Layer sparsity for normalised blocks: Conv/Dense/Depthwise -> BN -> ReLU."""

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.proximal import group_step, sparsity_groups

from helpers import to_numpy


def _conv_bn_net(depth=4):
    inputs = keras.Input((10, 10, 1))
    h = inputs
    for i in range(depth):
        h = keras.layers.Conv2D(4, 1 if i % 2 else 3, use_bias=False, name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def _images(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 10, 10, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int32")
    return x, y


def test_conv_bn_relu_blocks_are_eligible_and_relu6_is_not():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="a")(inputs)
    h = keras.layers.BatchNormalization(name="bn_a")(h)
    h = keras.layers.ReLU(name="relu_a")(h)
    h = keras.layers.Conv2D(4, 1, use_bias=False, name="b")(h)
    h = keras.layers.BatchNormalization(name="bn_b")(h)
    h = keras.layers.ReLU(max_value=6.0, name="relu6_b")(h)
    model = keras.Model(inputs, h)
    report = {e.name: e for e in ls.eligible_layers(model, nonnegative_inputs=True)}
    assert report["a"].eligible and report["a"].batchnorm == "bn_a"
    assert report["a"].activation == "relu_a"
    assert not report["b"].eligible and "cap" in report["b"].reason
    sparse = ls.apply_layer_sparsity(model, 1.0, nonnegative_inputs=True)
    assert isinstance(sparse.get_layer("a").kernel_regularizer, ls.LayerSparsity)
    assert sparse.get_layer("b").kernel_regularizer is None
    group, = sparsity_groups(sparse)
    assert group.batchnorm is sparse.get_layer("bn_a")


@pytest.mark.parametrize("block_step", ["effective", "raw"])
def test_trained_conv_bn_net_ends_with_inactive_blocks_that_fold_exactly(block_step):
    x, y = _images()
    model = ls.apply_layer_sparsity(_conv_bn_net(), 2.0, nonnegative_inputs=True,
                                    block_step=block_step)
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    norms = ls.negative_part_norms(model)
    inactive = [name for name, norm in norms.items() if norm == 0.0]
    assert inactive and history.history["active_layers"][-1] == len(norms) - len(inactive)
    for name in inactive:  # exactly non-negative under the moving statistics
        group, = [g for g in sparsity_groups(model) if g.name == name]
        kernel, bias = group.effective_weights()
        assert np.min(kernel) >= 0 and np.min(bias) >= 0
    folded, report = ls.fold(model, nonnegative_inputs=True, verify=x[:64],
                             return_report=True)
    assert report.after.depth < report.before.depth
    assert report.max_relative_error <= 1e-5


def test_dense_bn_relu_block_trains_to_inactive_and_folds():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(256, 6)).astype("float32")
    y = (x @ rng.uniform(size=(6, 1))).astype("float32")
    inputs = keras.Input((6,))
    h = inputs
    for i in range(3):
        h = keras.layers.Dense(8, use_bias=False, name=f"d{i}")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    base = keras.Model(inputs, keras.layers.Dense(1)(h))
    model = ls.apply_layer_sparsity(base, 0.5, nonnegative_inputs=True)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    assert 0.0 in ls.negative_part_norms(model).values()
    folded, report = ls.fold(model, nonnegative_inputs=True, verify=x[:64],
                             return_report=True)
    assert report.after.depth < report.before.depth
    assert report.max_relative_error <= 1e-5


@pytest.mark.parametrize("layer", ["depthwise", "separable"])
def test_depthwise_and_separable_blocks_step_on_their_effective_weights(layer):
    inputs = keras.Input((6, 6, 3))
    if layer == "depthwise":
        conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="conv",
                                            depthwise_regularizer=ls.LayerSparsity(1.0))
    else:
        conv = keras.layers.SeparableConv2D(4, 3, name="conv",
                                            depthwise_regularizer=ls.LayerSparsity(1.0),
                                            pointwise_regularizer=ls.LayerSparsity(1.0))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, keras.layers.ReLU()(bn(conv(inputs))))
    channels = 6 if layer == "depthwise" else 4
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(-2, 2, channels), rng.normal(size=channels),
                    rng.normal(size=channels), rng.uniform(0.5, 2, channels)])
    group, = sparsity_groups(model)
    assert group.batchnorm is bn and group.negative_norm() > 0
    values = group_step(group, keras.optimizers.SGD(1e3))
    for variable in group.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
    assert group.negative_norm() == 0.0
    # the merged map really is non-negative on non-negative inputs
    x = rng.uniform(size=(16, 6, 6, 3)).astype("float32")
    pre_relu = keras.Model(inputs, bn(conv(inputs)))
    assert np.min(to_numpy(pre_relu(x, training=False))) >= 0


def test_keras_round_trip_of_a_model_with_penalised_blocks(tmp_path):
    x, y = _images(64)
    model = ls.apply_layer_sparsity(_conv_bn_net(), 0.5, nonnegative_inputs=True,
                                    block_step="raw")
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "blocks.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    assert isinstance(again, ls.LayerSparseModel)
    np.testing.assert_array_equal(to_numpy(again(x[:8])), to_numpy(model(x[:8])))
    assert [g.name for g in sparsity_groups(again)] == [g.name for g in sparsity_groups(model)]
    assert all(g.batchnorm is not None and g.block_step == "raw"
               for g in sparsity_groups(again))
    again.fit(x, y, epochs=1, verbose=0)  # and it trains on, with its callback


@pytest.mark.parametrize("block", [False, True])
def test_a_held_group_is_projected_even_when_the_learning_rate_has_decayed_to_zero(block):
    # cosine decay reaches a rate of exactly 0 in float32 over its last
    # steps while SGD's momentum still moves the weights: the proximal step
    # is then the identity, and only a projection keeps the layer inactive
    from tf_layersparse.proximal import HOLD_STRENGTH

    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv", kernel_regularizer=ls.LayerSparsity(1.0))
    h = conv(inputs)
    bn = None
    if block:
        bn = keras.layers.BatchNormalization(name="bn")
        h = bn(h)
    model = keras.Model(inputs, keras.layers.ReLU()(h))
    rng = np.random.default_rng(0)
    conv.kernel.assign(rng.normal(scale=1e-9, size=conv.kernel.shape))
    conv.bias.assign(rng.uniform(1, 2, size=4))
    if bn is not None:
        bn.set_weights([rng.uniform(0.5, 2, 4), rng.uniform(1, 2, 4),
                        rng.normal(scale=0.1, size=4), rng.uniform(0.5, 2, 4)])
    group, = sparsity_groups(model)
    group.strength_variable = keras.Variable(HOLD_STRENGTH, trainable=False)
    assert group.negative_norm() > 0
    values = group_step(group, keras.optimizers.SGD(0.0, momentum=0.9))
    for variable in group.variables:
        if id(variable) in values:
            variable.assign(values[id(variable)])
    assert group.negative_norm() == 0.0
