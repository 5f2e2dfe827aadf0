"""The models `fold` is tested on: `keras.applications` convnets and small graphs.

The zoo is the set of models a new user would try `fold` on: the
`keras.applications` convnets (weights=None, at their smallest input), LSTM
and GRU models with `Masking`, and small Functional graphs that once made
`fold` crash or silently return wrong outputs (raw `keras.ops` between
layers, a custom layer without `compute_output_shape`, `Lambda`,
`TimeDistributed`, an adapted `Normalization`, bicubic/lanczos upsampling
before a ReLU, `BatchNormalization(axis=-1)` after a `channels_first` conv).
`tests/test_zoo.py` folds them; `benchmarks/fold_zoo.py` times them.

Every model comes in two variants:

* "random": Keras' random initialisation, BatchNormalization statistics
  drawn at random (so folding BN is not folding an identity);
* "identities": every kernel made non-negative (and normalised so values
  stay finite through 50 layers), biases and BatchNormalization offsets
  positive, inputs non-negative: the ReLUs are identities and merges happen.
"""

import dataclasses

import keras
import numpy as np

__all__ = [
    "APPLICATIONS",
    "inactive_mobilenetv2",
    "ZOO",
    "Entry",
    "available",
    "backend_flops",
    "build",
    "inputs_for",
    "make_identities",
    "predict",
    "randomize_batchnorm",
    "relative_error",
]

A = keras.applications


@dataclasses.dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it and what inputs it takes.

    `inputs(rng, batch, nonnegative)` returns a batch for the model;
    `fast` marks the models CI folds on every run; `depth_drops` says
    whether the "identities" variant must lose affine layers under
    `policy="depth"` (a merge exists that the rules allow); `backends` are
    those that can run it; `xla` runs it compiled on TensorFlow (whose CPU
    kernels have no channels_first conv, while XLA's do).
    """

    build: callable
    inputs: callable
    fast: bool = False
    depth_drops: bool = True
    backends: tuple = ("tensorflow", "jax", "torch")
    xla: bool = False


def _images(size, channels=3, channels_first=False, pixels=False):
    """Random images; `pixels` draws 0..255 for models that rescale inside."""

    def draw(rng, batch, nonnegative):
        shape = (batch, channels, size, size) if channels_first else (batch, size, size, channels)
        if pixels:
            return rng.uniform(0.0, 255.0, shape).astype("float32")
        x = rng.standard_normal(shape)
        return (np.abs(x) if nonnegative else x).astype("float32")

    return draw


def _vectors(*shape, loc=0.0, scale=1.0):
    def draw(rng, batch, nonnegative):
        x = loc + scale * rng.standard_normal((batch,) + shape)
        return (np.abs(x) if nonnegative else x).astype("float32")

    return draw


def _masked_sequences(steps, features):
    """Sequences whose trailing steps are all zero, which Masking skips."""

    def draw(rng, batch, nonnegative):
        x = rng.standard_normal((batch, steps, features))
        x = np.abs(x) if nonnegative else x
        lengths = rng.integers(1, steps + 1, batch)
        x[np.arange(steps)[None, :] >= lengths[:, None]] = 0.0
        return x.astype("float32")

    return draw


def _application(factory, size, **kwargs):
    def make():
        return factory(weights=None, input_shape=(size, size, 3), classes=5,
                       classifier_activation=None, **kwargs)

    return make


def _dense_chain(x, widths, prefix):
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation="relu", name=f"{prefix}{i}")(x)
    return x


def _raw_ops():
    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="d0")(x)
    h = h * 0.5 + keras.ops.abs(h)
    h = _dense_chain(h, [16, 16], "d1_")
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="raw_ops")


def _raw_ops_residual():
    """`x + y` residuals as raw ops (as in ConvNeXt, MobileNetV3)."""
    x = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c0")(x)
    r = keras.layers.Conv2D(6, 1, activation="relu", name="c1")(h)
    r = keras.layers.Conv2D(6, 3, padding="same", name="c2")(r)
    h = h + r
    h = keras.ops.maximum(h, 0.0)
    h = keras.layers.Conv2D(6, 1, activation="relu", name="c3")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = _dense_chain(h, [8], "d")
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="raw_ops_residual")


class _Scale(keras.layers.Layer):
    """Per-feature trainable scale without `compute_output_shape`."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.RandomUniform(0.5, 1.5),
            name="scale")

    def call(self, x):
        return x * self.scale - 0.25


def _custom_layer():
    x = keras.Input((8,))
    h = _dense_chain(x, [16, 16], "a")
    h = _Scale(name="scale")(h)
    h = _dense_chain(h, [16, 16], "b")
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="custom_layer")


def _lambda():
    x = keras.Input((8,))
    h = _dense_chain(x, [16, 16], "a")
    h = keras.layers.Lambda(lambda t: 2.0 * t - 1.0, name="shift")(h)
    h = _dense_chain(h, [16, 16], "b")
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="lambda")


def _time_distributed():
    x = keras.Input((5, 6))
    h = keras.layers.TimeDistributed(
        keras.layers.Dense(8, activation="relu"), name="td")(x)
    h = _dense_chain(h, [8, 8], "d")
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="time_distributed")


_NORM_LOC, _NORM_SCALE = 3.0 * np.arange(1, 9), 2.0 * np.arange(1, 9)


def _normalization():
    rng = np.random.default_rng(7)
    norm = keras.layers.Normalization(name="norm")
    norm.adapt((_NORM_LOC + _NORM_SCALE * rng.standard_normal((256, 8))).astype("float32"))
    x = keras.Input((8,))
    h = _dense_chain(norm(x), [16, 16, 16], "d")
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="normalization")


def _upsampling(interpolation):
    def make():
        x = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c0")(x)
        h = keras.layers.UpSampling2D(2, interpolation=interpolation, name="up")(h)
        h = keras.layers.ReLU(name="relu_up")(h)
        h = keras.layers.Conv2D(4, 3, name="c1")(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.Conv2D(4, 1, activation="relu", name="c2")(h)
        h = keras.layers.Flatten()(h)
        return keras.Model(x, keras.layers.Dense(3, name="out")(h), name=f"up_{interpolation}")

    return make


def _channels_first_bn():
    """BN on the last (width) axis after a channels_first conv: width 8 equals
    the conv's 8 channels, so a channel-wise fold has matching shapes."""
    x = keras.Input((2, 10, 10))
    h = keras.layers.Conv2D(8, 3, data_format="channels_first", name="conv")(x)
    h = keras.layers.BatchNormalization(axis=-1, name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 1, data_format="channels_first", activation="relu", name="conv1")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="channels_first_bn")


def _spatial_axis_bn():
    """BN on the height axis (axis=1) of a channels_last conv whose height 8
    equals its 8 channels: only the axis tells the two apart."""
    x = keras.Input((10, 12, 2))
    h = keras.layers.Conv2D(8, 3, name="conv")(x)
    h = keras.layers.BatchNormalization(axis=1, name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 1, activation="relu", name="conv1")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="spatial_axis_bn")


def _recurrent(cell):
    def make():
        x = keras.Input((7, 4))
        h = keras.layers.Masking(0.0)(x)
        h = keras.layers.Dense(6, activation="relu", name="embed")(h)
        h = cell(8, name="rnn")(h)
        h = _dense_chain(h, [8, 8], "d")
        return keras.Model(x, keras.layers.Dense(3, name="out")(h), name=cell.__name__.lower())

    return make


ZOO = {
    "VGG16": Entry(_application(A.VGG16, 32), _images(32)),
    "ResNet50": Entry(_application(A.ResNet50, 64), _images(64)),
    "ResNet50V2": Entry(_application(A.ResNet50V2, 32), _images(32)),
    "MobileNetV2": Entry(_application(A.MobileNetV2, 32), _images(32)),
    "MobileNetV3Small": Entry(_application(A.MobileNetV3Small, 32), _images(32, pixels=True),
                              depth_drops=False, fast=True),
    "EfficientNetB0": Entry(_application(A.EfficientNetB0, 32), _images(32, pixels=True), depth_drops=False),
    "ConvNeXtTiny": Entry(_application(A.ConvNeXtTiny, 32), _images(32, pixels=True), depth_drops=False),
    "DenseNet121": Entry(_application(A.DenseNet121, 32), _images(32), depth_drops=False),
    "Xception": Entry(_application(A.Xception, 71), _images(71)),
    "InceptionV3": Entry(_application(A.InceptionV3, 75), _images(75)),
    "LSTM_masking": Entry(_recurrent(keras.layers.LSTM), _masked_sequences(7, 4), fast=True),
    "GRU_masking": Entry(_recurrent(keras.layers.GRU), _masked_sequences(7, 4), fast=True),
    "raw_ops": Entry(_raw_ops, _vectors(8), fast=True),
    "raw_ops_residual": Entry(_raw_ops_residual, _images(10), fast=True),
    "custom_layer": Entry(_custom_layer, _vectors(8), fast=True),
    "lambda": Entry(_lambda, _vectors(8), fast=True),
    "time_distributed": Entry(_time_distributed, _vectors(5, 6), fast=True,
                              depth_drops=False),
    "normalization": Entry(_normalization, _vectors(8, loc=_NORM_LOC, scale=_NORM_SCALE),
                           fast=True),
    "upsampling_bicubic": Entry(_upsampling("bicubic"), _images(6, 2), fast=True),
    # Keras' torch backend has no Lanczos resize
    "upsampling_lanczos3": Entry(_upsampling("lanczos3"), _images(6, 2), fast=True,
                                 backends=("tensorflow", "jax")),
    "channels_first_bn": Entry(_channels_first_bn, _images(10, 2, channels_first=True),
                               fast=True, backends=("tensorflow", "jax"), xla=True),
    "spatial_axis_bn": Entry(_spatial_axis_bn, _vectors(10, 12, 2), fast=True),
}


APPLICATIONS = ("VGG16", "ResNet50", "ResNet50V2", "MobileNetV2", "MobileNetV3Small",
                "EfficientNetB0", "ConvNeXtTiny", "DenseNet121", "Xception", "InceptionV3")


def available(name):
    """Whether zoo model `name` runs on the current Keras backend.

    >>> available("raw_ops")
    True
    """
    return keras.backend.backend() in ZOO[name].backends


def inputs_for(name, variant, batch, seed=0):
    """A batch for zoo model `name`; non-negative for the "identities" variant.

    >>> inputs_for("raw_ops", "identities", 2).shape
    (2, 8)
    """
    return ZOO[name].inputs(np.random.default_rng(seed), batch, variant == "identities")


def _layers(model):
    """Every layer, looking inside TimeDistributed/Bidirectional wrappers."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        yield layer


def randomize_batchnorm(model, seed=0):
    """Draw every BatchNormalization's gamma, beta, mean and variance at random,
    near the identity (gamma / sigma in about [0.8, 1.25]) so that deep nets'
    activations neither vanish nor overflow.

    Keras initialises BN as the identity, which would hide a wrong fold.

    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    >>> randomize_batchnorm(m); bool(np.all(m.layers[0].get_weights()[0] != 1.0))
    True
    """
    rng = np.random.default_rng(seed)
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            _draw_batchnorm(layer, {"gamma": (0.8, 1.2), "beta": (-0.1, 0.1),
                                    "moving_mean": (-0.1, 0.1),
                                    "moving_variance": (0.8, 1.2)}, rng)


def _draw_batchnorm(layer, ranges, rng):
    """Each BatchNormalization weight uniform in its `ranges[name]`."""
    layer.set_weights([rng.uniform(*ranges[w.path.rsplit("/", 1)[-1]], w.shape).astype(w.dtype)
                       for w in layer.weights])


def _nonnegative_kernel(kernel, reduce_axes, rng):
    """A non-negative kernel that passes its input on: each output takes one
    input tap with weight in [0.9, 1], plus a small non-negative average of
    the rest. Averaging kernels alone would wash the input out of a deep net's
    outputs (and a fold error with it); this keeps outputs input-dependent
    without blowing them up."""
    k = np.moveaxis(np.abs(kernel), [*reduce_axes], list(range(len(reduce_axes))))
    shape = k.shape
    k = k.reshape(int(np.prod(shape[:len(reduce_axes)])), -1)
    k = 0.05 * k / np.maximum(np.sum(k, axis=0, keepdims=True), 1e-12)
    picks = rng.integers(0, k.shape[0], k.shape[1])
    k[picks, np.arange(k.shape[1])] += rng.uniform(0.9, 1.0, k.shape[1])
    k = k.reshape(shape)
    return np.moveaxis(k, list(range(len(reduce_axes))), [*reduce_axes]).astype(kernel.dtype)


def make_identities(model, seed=0):
    """Make every ReLU in `model` an identity on non-negative inputs, in place.

    Dense/Conv/Depthwise/Separable kernels become non-negative (normalised
    per output), biases positive, BatchNormalization gamma positive with a
    positive offset and negative mean (so `gamma (x - mean) / sigma + beta`
    is > 0 for x >= 0).

    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> make_identities(m); bool(np.all(m.get_weights()[0] >= 0))
    True
    """
    rng = np.random.default_rng(seed)
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            # gamma / sigma close to 1 passes the input on (see _nonnegative_kernel)
            _draw_batchnorm(layer, {"gamma": (0.85, 1.0), "beta": (0.02, 0.1),
                                    "moving_mean": (-0.1, 0.0),
                                    "moving_variance": (0.95, 1.05)}, rng)
            continue
        values = []
        changed = False
        for w in layer.weights:
            v = keras.ops.convert_to_numpy(w)
            tag = w.path.rsplit("/", 1)[-1]
            depthwise = isinstance(layer, (keras.layers.DepthwiseConv1D,
                                           keras.layers.DepthwiseConv2D))
            if tag == "depthwise_kernel" or (tag == "kernel" and depthwise):
                v = _nonnegative_kernel(v, tuple(range(v.ndim - 2)), rng)
            elif tag == "kernel" and v.ndim >= 2:
                v = _nonnegative_kernel(v, tuple(range(v.ndim - 1)), rng)
            elif tag == "pointwise_kernel":
                v = _nonnegative_kernel(v, tuple(range(v.ndim - 1)), rng)
            elif tag == "bias":
                v = rng.uniform(0.01, 0.05, v.shape).astype(v.dtype)
            else:
                values.append(v)
                continue
            changed = True
            values.append(v.astype(w.dtype))
        if changed and not list(layer._flatten_layers(include_self=False)):
            layer.set_weights(values)


def build(name, variant, seed=0):
    """Build zoo model `name` with weights set for `variant`.

    >>> build("raw_ops", "identities").name
    'raw_ops'
    """
    keras.utils.set_random_seed(seed)
    model = ZOO[name].build()
    if variant == "identities":
        make_identities(model, seed)
    else:
        randomize_batchnorm(model, seed)
    return model


def predict(model, x, xla=False):
    """The model's outputs on `x` as a list of float64 arrays; `xla` compiles
    the call on TensorFlow (channels_first convs run only there on CPU).

    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> [y.shape for y in predict(m, np.ones((3, 2), "float32"))]
    [(3, 1)]
    """
    if xla and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        y = tf.function(lambda t: model(t, training=False), jit_compile=True)(x)
    else:
        y = model(x, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in keras.tree.flatten(y)]


def relative_error(reference, candidate, x, xla=False):
    """Max |candidate - reference| over max |reference|, over all outputs.

    NaN or inf anywhere gives inf, so a broken fold never passes.

    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> relative_error(m, m, np.ones((3, 2), "float32"))
    0.0
    """
    expected, actual = predict(reference, x, xla), predict(candidate, x, xla)
    if len(expected) != len(actual) or any(a.shape != b.shape for a, b in zip(expected, actual)):
        return float("inf")
    worst = 0.0
    for a, b in zip(expected, actual):
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return float("inf")
        scale = np.max(np.abs(a)) if a.size else 0.0
        err = np.max(np.abs(a - b)) if a.size else 0.0
        worst = max(worst, float(err / scale) if scale > 0 else float(err))
    return worst


def backend_flops(model, x):
    """FLOPs of one inference call on `x`, as the backend's compiler counts them
    (TensorFlow profiler on the frozen graph, or XLA's cost analysis on JAX);
    None on other backends or if the count fails.

    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    >>> backend_flops(m, np.ones((1, 3), "float32")) in (None, 12)
    True
    """
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf
            from tensorflow.python.framework.convert_to_constants import (
                convert_variables_to_constants_v2,
            )

            spec = tf.TensorSpec(x.shape, x.dtype)
            fn = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
            graph = convert_variables_to_constants_v2(fn).graph
            builder = tf.compat.v1.profiler.ProfileOptionBuilder
            opts = builder(builder.float_operation()).with_empty_output().build()
            return int(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)
        if backend == "jax":
            import jax

            state = ([v.value for v in model.trainable_variables],
                     [v.value for v in model.non_trainable_variables])
            fn = jax.jit(lambda s, t: model.stateless_call(s[0], s[1], t, training=False)[0])
            cost = fn.lower(state, x).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return int(cost["flops"])
    except Exception:  # a count we cannot make is reported as missing, not as 0
        return None
    return None


# ---------------------------------------------------------------- MobileNetV2, inactive
#
# Models the fold tests (and `benchmarks/fold_mobilenetv2.py`) fold.
# 
# `inactive_mobilenetv2` is `keras.applications.MobileNetV2` as Keras builds
# it ('same' depthwise convolutions at stride 1, `ZeroPadding2D` + 'valid' at
# stride 2, no expand layer in the first block), with its capped ReLU(6.)
# replaced by plain ReLUs and weights as if the layer-sparsity penalty had
# switched every inverted residual off: the expand, depthwise and project
# blocks have non-negative effective weights (BatchNormalization included,
# with positive biases, so the expand layers carry a bias into the padded
# depthwise convolutions). The project blocks must be non-negative too: their
# output is the next block's input, and an expand ReLU is only provably the
# identity on an input >= 0. The stem and the last 1x1 convolution keep
# signed weights.



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
