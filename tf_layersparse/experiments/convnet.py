"""Convnets for the depth-vs-latency study (issue 13): architectures and training.

Two families, both for 28x28x1 images in [0, 1] and 10 classes (logits):

- `mobilenet_net`: MobileNetV2-style inverted residual blocks, widths
  16-32-64, `blocks` per stage, expansion 6. Each block is written as users
  write it: `1x1 expand C->6C -> BN -> ReLU -> 3x3 depthwise ('same') -> BN
  -> ReLU -> 1x1 project 6C->C -> BN`, plus the skip `Add`, then a ReLU.
  One departure from MobileNetV2, so that layer sparsity can pay off
  exactly:

  * *post-add ReLU* (ResNet-style post-activation). The paper's condition
    needs a non-negative input to the expand layer; MobileNetV2's linear
    bottleneck hands the next block a signed tensor, so its expand ReLU can
    never be an identity. With the ReLU after the add, every expand layer
    reads a ReLU output.

  With both ReLUs identities, `fold` turns the block into one 3x3 'same'
  conv C->C with the identity in its centre tap, exactly: the depthwise
  conv's zero padding meets the expand layer's (BN) bias at the border,
  which a `BiasMap` after the conv (9C numbers) makes up for. (Earlier runs
  of the study padded the block's input with `ZeroPadding2D(1)` and used
  'valid' convs instead, which folds to the same conv without the map; the
  results in `docs/results/convnet_*` come from that form.)

  Stages are joined by a stride-2 3x3 Conv-BN-ReLU that doubles the width,
  after a stride-2 3x3 Conv-BN-ReLU stem (1->16, so the stages run at 14x14,
  7x7 and 4x4 as MobileNetV2 downsamples first too), and the head is global average
  pooling and a Dense layer. A block with both ReLUs identities costs
  `12C^2 + 54C` multiply-adds per position; collapsed, `9C^2` (plus one
  addition per output element for the bias map).
- `vgg_net`: a VGG-BN stack of 3x3 'same' Conv-BN-ReLU blocks (two per
  width, max pooling between widths) as the control, where merging two
  3x3 convs into a 5x5 costs more, so the cost-aware fold should refuse.

`train` fits a model with SGD+momentum (or the caller's optimizer) on
in-memory arrays; `magnitude_prune` and `PruneMasks` give the Keras-native
magnitude-pruning peer.
"""

import dataclasses
import time

import keras
import numpy as np

__all__ = [
    "ARCHS",
    "INPUT_SHAPE",
    "BN_MOMENTUM",
    "TrainConfig",
    "build",
    "mobilenet_net",
    "vgg_net",
    "train",
    "augmenter",
    "augmented",
    "accuracy",
    "magnitude_prune",
    "PruneMasks",
    "nonzero_params",
    "kernel_size",
    "to_images",
]

INPUT_SHAPE = (28, 28, 1)
ARCHS = ("mobilenet", "vgg")
_CLASSES = 10
# Keras' default 0.99 leaves the moving statistics far from the batch ones after
# the few hundred steps a short run takes, and 20-odd BN layers compound the error
BN_MOMENTUM = 0.9


def to_images(flat, shape=INPUT_SHAPE):
    """Flattened rows (as `datasets.load_images` gives) -> (n,) + `shape`.

    >>> to_images(np.zeros((3, 784), "float32")).shape
    (3, 28, 28, 1)
    """
    return np.asarray(flat, "float32").reshape((-1,) + tuple(shape))


def _conv_bn_relu(h, filters, kernel, name, strides=1, padding="same"):
    h = keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                            use_bias=False, name=f"{name}_conv")(h)
    h = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(h)
    return keras.layers.ReLU(name=f"{name}_relu")(h)


def _inverted_residual(x, channels, expansion, name):
    h = _conv_bn_relu(x, channels * expansion, 1, f"{name}_expand", padding="valid")
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                     name=f"{name}_dw")(h)
    h = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_dw_bn")(h)
    h = keras.layers.ReLU(name=f"{name}_dw_relu")(h)
    h = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_project")(h)
    h = keras.layers.BatchNormalization(momentum=BN_MOMENTUM,
                                        name=f"{name}_project_bn")(h)
    h = keras.layers.Add(name=f"{name}_add")([x, h])
    return keras.layers.ReLU(name=f"{name}_out")(h)  # post-activation: see module doc


def _per_stage(count, widths):
    return tuple(count) if isinstance(count, (tuple, list)) else (count,) * len(widths)


def mobilenet_net(widths=(16, 32, 64), blocks=3, expansion=6, seed=0,
                  input_shape=INPUT_SHAPE):
    """Inverted-residual net with post-add ReLUs (module docstring); `blocks` per
    stage, one number for all or one per stage. The stem has stride 2 for
    28x28 inputs (stages at 14x14, 7x7, 4x4) and stride 1 from 32x32 up, as
    CIFAR variants of MobileNetV2 keep (stages at 32x32, 16x16, 8x8 for
    CIFAR-10): a stride-2 stem on 32x32 images leaves the last stage 4x4.

    >>> model = mobilenet_net(widths=(8, 16), blocks=1, expansion=2)
    >>> model.output_shape, len(model.layers)
    ((None, 10), 29)
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    h = _conv_bn_relu(inputs, widths[0], 3, "stem", strides=2 if input_shape[0] < 32 else 1)
    for stage, width in enumerate(widths):
        if stage:
            h = _conv_bn_relu(h, width, 3, f"down{stage}", strides=2)
        for block in range(_per_stage(blocks, widths)[stage]):
            h = _inverted_residual(h, width, expansion, f"s{stage}b{block}")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(_CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name="mobilenet")


def vgg_net(widths=(16, 32, 64), convs=2, seed=0, input_shape=INPUT_SHAPE):
    """VGG-BN control: `convs` 3x3 Conv-BN-ReLU blocks per width (one number for
    all or one per width), pooling between.

    >>> vgg_net(widths=(8,), convs=2).count_params()
    802
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for stage, width in enumerate(widths):
        if stage:
            h = keras.layers.MaxPooling2D(2, name=f"pool{stage}")(h)
        for block in range(_per_stage(convs, widths)[stage]):
            h = _conv_bn_relu(h, width, 3, f"s{stage}c{block}")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(_CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name="vgg")


def build(arch, seed=0, small=False, input_shape=INPUT_SHAPE):
    """The study's network of family `arch` (`small`: a tiny one for tests) for
    images of `input_shape`.

    >>> build("vgg", small=True).name, build("mobilenet", input_shape=(32, 32, 3)).input_shape
    ('vgg', (None, 32, 32, 3))
    """
    if arch == "mobilenet":
        return mobilenet_net(*(((8, 16), 1) if small else ((16, 32, 64), 3)), 6, seed,
                             input_shape)
    if arch == "vgg":
        return vgg_net(*(((8, 16), 2) if small else ((16, 32, 64), 2)), seed, input_shape)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


@dataclasses.dataclass
class TrainConfig:
    """How every model of the study is trained (the same for all, for fairness)."""

    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    constant: bool = False  # a constant rate instead of the cosine decay
    augment: bool = False   # random 4-pixel shifts (crop with padding) and horizontal flips

    def optimizer(self, steps_per_epoch):
        """SGD with momentum; cosine decay to 0, or a constant rate if `constant`.

        The penalised run decays too. A constant rate keeps moving each
        block's kernel, so the BatchNormalization moving statistics lag the
        batch statistics and inference (which uses them) falls far below
        training accuracy (docs/RESULTS.md, issue 11). With the decay,
        layers that large early steps made inactive can turn active again
        as the rate falls: an exactly zero negative part stays zero only
        where the data gradient's negative part is below the strength,
        whatever the rate, and that transient inactivity was not such a
        point (docs/RESULTS.md, convnet re-run).
        """
        if self.constant:
            return keras.optimizers.SGD(self.learning_rate, momentum=self.momentum)
        schedule = keras.optimizers.schedules.CosineDecay(
            self.learning_rate, max(1, self.epochs * steps_per_epoch))
        return keras.optimizers.SGD(schedule, momentum=self.momentum)


def compile_for_training(model, config, n_train):
    """Compile `model` in place with the study's optimizer, loss and metric."""
    steps = -(-n_train // config.batch_size)
    model.compile(config.optimizer(steps),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def train(model, x, y, config, *, callbacks=(), log=print, tag="", compile=True,
          validation_data=None):
    """Fit `model` (in place) on `(x, y)`; returns its History.

    Prints one line per epoch with loss, accuracy and any extra logs (such
    as `active_layers`). `compile=False` keeps the caller's compile;
    `validation_data` is passed to `fit` (inference-mode curves).
    """
    if compile:
        compile_for_training(model, config, len(x))
    keras.utils.set_random_seed(config.seed)
    start = time.perf_counter()

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items())
            log(f"  {tag} epoch {epoch + 1}/{config.epochs}: {shown} "
                f"({time.perf_counter() - start:.0f} s)")

    data = dict(x=x, y=y, batch_size=config.batch_size)
    if config.augment:
        data = dict(x=augmented(x, y, config.batch_size, config.seed))
    return model.fit(**data, epochs=config.epochs, verbose=0, shuffle=not config.augment,
                     callbacks=list(callbacks) + [_Progress()],
                     validation_data=validation_data)


def augmenter(shape, seed=0):
    """The usual CIFAR augmentation as Keras preprocessing layers: a random crop
    of the image padded by 4 zero pixels (a shift by up to 4 pixels, zeros
    filled in) and a random horizontal flip.

    Returns the layers in order (each works inside a `tf.data` pipeline on
    every backend; a `keras.Sequential` of them would not).

    >>> x = np.ones((2, 32, 32, 3), "float32")
    >>> for layer in augmenter((32, 32, 3)):
    ...     x = layer(x, training=True)
    >>> tuple(x.shape), float(keras.ops.min(x)) >= 0.0
    ((2, 32, 32, 3), True)
    """
    pixels = 4 / shape[0], 4 / shape[1]
    return [keras.layers.RandomTranslation(*pixels, fill_mode="constant", fill_value=0.0,
                                           interpolation="nearest", seed=seed),
            keras.layers.RandomFlip("horizontal", seed=seed + 1)]


def augmented(x, y, batch_size, seed=0):
    """A shuffled `tf.data` pipeline of `(x, y)` batches through `augmenter`; it
    feeds `fit` on every backend."""
    import tensorflow as tf

    layers = augmenter(x.shape[1:], seed)

    def augment(images, labels):
        for layer in layers:
            images = layer(images, training=True)
        return images, labels

    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    data = data.batch(batch_size).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def accuracy(model, x, y, batch_size=256):
    """Fraction of `x` whose argmax output equals `y`.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> model.set_weights([np.eye(2, dtype="float32"), np.zeros(2, "float32")])
    >>> accuracy(model, np.array([[1., 0.], [0., 1.]]), np.array([0, 0]))
    0.5
    """
    predictions = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(predictions, axis=-1) == np.asarray(y)))


def _prunable(layer):
    return isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense,
                              keras.layers.DepthwiseConv2D))


def _kernel(layer):
    return layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel


def kernel_size(model):
    """Number of conv/dense/depthwise kernel entries in `model` (what pruning may zero).

    >>> kernel_size(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    12
    """
    return sum(int(np.prod(_kernel(layer).shape)) for layer in model.layers
               if _prunable(layer))


def magnitude_prune(model, keep):
    """Zero all but `keep` conv/dense/depthwise kernel entries by magnitude; in place.

    Every layer keeps the same fraction of its kernel, its largest entries
    (TFMOT's default: uniform sparsity per layer, so no layer is cut off
    whole). Returns `{layer name: 0/1 mask}` for `PruneMasks` during the
    fine-tune. Biases and BatchNormalization weights are not pruned.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    >>> masks = magnitude_prune(model, 6)
    >>> int(masks["d"].sum()), int(np.count_nonzero(model.layers[0].kernel))
    (6, 6)
    """
    layers = [layer for layer in model.layers if _prunable(layer)]
    fraction = min(1.0, max(0.0, keep / max(1, kernel_size(model))))
    masks = {}
    for layer in layers:
        k = keras.ops.convert_to_numpy(_kernel(layer))
        n_keep = int(round(fraction * k.size))
        order = np.argsort(-np.abs(k).ravel(), kind="stable")
        mask = np.zeros(k.size, "float32")
        mask[order[:n_keep]] = 1.0
        mask = mask.reshape(k.shape)
        _kernel(layer).assign(k * mask)
        masks[layer.name] = mask
    return masks


def nonzero_params(model):
    """Number of non-zero weights (trainable or not) in `model`.

    >>> nonzero_params(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]))
    6
    """
    return int(sum(np.count_nonzero(keras.ops.convert_to_numpy(w)) for w in model.weights))


class PruneMasks(keras.callbacks.Callback):
    """Keep pruned kernel entries at zero while fine-tuning (re-applied after every batch).

    The masks come from `magnitude_prune`. Re-applying after each step is
    the Keras-native form of TFMOT's pruning wrapper: the optimizer may move
    a pruned weight within a step, the mask then puts it back to zero.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> masks = magnitude_prune(model, 2)
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(np.ones((4, 2)), np.ones((4, 2)), verbose=0, callbacks=[PruneMasks(masks)])
    >>> int(np.count_nonzero(model.layers[0].kernel))
    2
    """

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def _apply(self):
        for name, mask in self.masks.items():
            variable = _kernel(self.model.get_layer(name))
            variable.assign(variable * mask)

    def on_train_batch_end(self, batch, logs=None):
        self._apply()

    def on_train_end(self, logs=None):
        self._apply()
