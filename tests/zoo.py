"""Models the fold tests (and `benchmarks/fold_mobilenetv2.py`) fold.

`inactive_mobilenetv2` is `keras.applications.MobileNetV2` as Keras builds
it ('same' depthwise convolutions at stride 1, `ZeroPadding2D` + 'valid' at
stride 2, no expand layer in the first block), with its capped ReLU(6.)
replaced by plain ReLUs and weights as if the layer-sparsity penalty had
switched every inverted residual off: the expand, depthwise and project
blocks have non-negative effective weights (BatchNormalization included,
with positive biases, so the expand layers carry a bias into the padded
depthwise convolutions). The project blocks must be non-negative too: their
output is the next block's input, and an expand ReLU is only provably the
identity on an input >= 0. The stem and the last 1x1 convolution keep
signed weights.
"""

import keras
import numpy as np

_BLOCK_PARTS = ("expand", "depthwise", "project")


def _in_block(name):
    return (name.startswith("block_") or name.startswith("expanded_conv")) and any(
        part in name for part in _BLOCK_PARTS)


def _uncapped(layer):
    if isinstance(layer, keras.layers.ReLU) and layer.max_value is not None:
        return keras.layers.ReLU(name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def inactive_mobilenetv2(input_shape=(96, 96, 3), alpha=1.0, include_top=True, seed=0,
                         classifier_activation="softmax"):
    """MobileNetV2 with ReLU() for ReLU(6.) and every block inactive on inputs >= 0.

    Each block kernel is the absolute value of its initial draw divided by
    its fan-in sum, so that activations stay of order one through the 17
    blocks; BatchNormalization gets gamma in [0.5, 1.5], beta in [0, 0.5],
    a non-positive moving mean and a variance in [0.5, 2].
    `classifier_activation=None` gives logits (a softmax over 1000 classes
    saturates and hides errors).
    """
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(weights=None, input_shape=input_shape, alpha=alpha,
                                          include_top=include_top,
                                          classifier_activation=classifier_activation)
    model = keras.models.clone_model(base, clone_function=_uncapped)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape
            signed = not _in_block(layer.name)
            layer.set_weights([
                rng.uniform(0.5, 1.5, c),
                rng.uniform(-0.5 if signed else 0.0, 0.5, c),
                rng.uniform(-0.5, 0.5 if signed else 0.0, c),
                rng.uniform(0.5, 2.0, c)])
        elif weights:
            kernel = weights[0]
            if _in_block(layer.name):
                kernel = np.abs(kernel)
                axes = tuple(range(kernel.ndim - 2)) if isinstance(
                    layer, keras.layers.DepthwiseConv2D) else tuple(range(kernel.ndim - 1))
                kernel = kernel / kernel.sum(axis=axes, keepdims=True)
            layer.set_weights([kernel] + weights[1:])
    return model
