"""One line to train an existing model for layer sparsity.

`apply_layer_sparsity` copies a Sequential or Functional model, puts
`LayerSparsity` on every layer (or Conv/Dense -> BatchNormalization block)
whose ReLU-type activation reads a non-negative input, and returns a
`LayerSparseModel`: a Functional model whose `fit` adds the `ActiveLayers`
callback when the caller did not, so the proximal steps run through the
same mechanism as for any model (see `tf_layersparse.proximal`).
"""

import inspect

import keras

from tf_layersparse.callbacks import ActiveLayers
from tf_layersparse.folding.eligibility import eligible_layers
from tf_layersparse.regularizers import LayerSparsity

__all__ = ["LayerSparseModel", "apply_layer_sparsity"]

_FIT_CALLBACKS_POSITION = list(inspect.signature(keras.Model.fit).parameters).index(
    "callbacks") - 1  # without `self`


@keras.saving.register_keras_serializable(package="tf_layersparse")
class LayerSparseModel(keras.Model):
    """Functional model that trains with the layer-sparsity steps.

    Its `fit` runs an `ActiveLayers()` callback unless one is passed, so
    every tensor carrying `LayerSparsity` gets its proximal step after each
    optimizer update, on any backend and with any optimizer, and
    `active_layers` is logged. How each tensor is stepped (proximal or
    snapped, tensor or layer groups, blocks) is part of its regularizer, so
    `clone_model`, `get_config` and `.keras` files keep it. Build it like a
    Functional model, or let `apply_layer_sparsity` do it.

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> inputs = keras.Input((2,))
    >>> h = keras.layers.Dense(5, activation="relu")(inputs)
    >>> h = keras.layers.Dense(5, activation="relu",
    ...     kernel_regularizer=ls.LayerSparsity(0.5),
    ...     bias_regularizer=ls.LayerSparsity(0.5))(h)
    >>> model = ls.LayerSparseModel(inputs, keras.layers.Dense(1)(h))
    >>> model.compile(keras.optimizers.SGD(0.1), "mse")
    >>> _ = model.fit(np.ones((400, 2)), np.ones((400, 1)), batch_size=8, verbose=0)  # 50 steps
    >>> bool(np.min(keras.ops.convert_to_numpy(model.layers[2].kernel)) >= 0)
    True
    """

    def fit(self, *args, **kwargs):
        args = list(args)
        if len(args) > _FIT_CALLBACKS_POSITION:
            callbacks = args[_FIT_CALLBACKS_POSITION]
        else:
            callbacks = kwargs.get("callbacks")
        callbacks = list(callbacks or [])
        if not any(isinstance(c, ActiveLayers) for c in callbacks):
            # first, so that CSVLogger and TensorBoard see its logs
            callbacks.insert(0, ActiveLayers())
        if len(args) > _FIT_CALLBACKS_POSITION:
            args[_FIT_CALLBACKS_POSITION] = callbacks
        else:
            kwargs["callbacks"] = callbacks
        return super().fit(*args, **kwargs)


_REGULARIZER_KEYS = {
    # layer class name -> config keys of its kernel-like weights' regularizers
    "DepthwiseConv1D": ("depthwise_regularizer",),
    "DepthwiseConv2D": ("depthwise_regularizer",),
    "SeparableConv1D": ("depthwise_regularizer", "pointwise_regularizer"),
    "SeparableConv2D": ("depthwise_regularizer", "pointwise_regularizer"),
}


def _with_penalty(layer, config, regularizer):
    serialized = keras.saving.serialize_keras_object(regularizer)
    for key in _REGULARIZER_KEYS.get(type(layer).__name__, ("kernel_regularizer",)):
        config[key] = serialized
    if getattr(layer, "use_bias", False):
        config["bias_regularizer"] = serialized
    return config


def apply_layer_sparsity(
    model,
    strength,
    *,
    nonnegative_inputs=False,
    proximal=True,
    snap_tolerance=0.0,
    group="tensor",
    block_step="raw",
    return_report=False,
):
    """Return a copy of `model` that trains with the layer-sparsity penalty.

    Every eligible layer (see `eligible_layers`: a Dense, convolution,
    depthwise or separable convolution whose ReLU-type activation reads a
    non-negative input, directly or after a BatchNormalization) gets
    `LayerSparsity(strength)` on its kernel(s) and bias. The copy is a
    `LayerSparseModel`, whose `fit` takes the penalty's proximal steps, so
    that inactive layers and blocks become exactly non-negative. Weights are
    copied; `model` itself is left untouched. Compile the copy as usual.

    Args:
        model: a built Sequential or Functional model.
        strength: finite float >= 0, the tuning parameter.
        nonnegative_inputs: True if the model inputs are >= 0 (pixels), so
            that the first layer is eligible too.
        proximal: proximal steps (True), or plain subgradients (False;
            combine with `snap_tolerance`).
        snap_tolerance: set a group's negative part to 0 when its norm is
            at most this after a step (0 disables).
        group: "tensor" or "layer" (kernel and bias in one norm, as in the
            paper); blocks with BatchNormalization are always one group.
        block_step: "raw" or "effective" (see `tf_layersparse.proximal`).
            These four are the `LayerSparsity` arguments.
        return_report: also return the list of `Eligibility` records.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> base = keras.Sequential([keras.Input((2,))]
    ...     + [keras.layers.Dense(5, activation="relu") for _ in range(4)]
    ...     + [keras.layers.Dense(1)])
    >>> model, report = ls.apply_layer_sparsity(base, 0.1, return_report=True)
    >>> sum(e.eligible for e in report)
    3
    >>> model.compile(keras.optimizers.SGD(1e-2), "mse")
    """
    regularizer = LayerSparsity(strength, proximal=proximal, group=group,
                                snap_tolerance=snap_tolerance, block_step=block_step)
    report = eligible_layers(model, nonnegative_inputs)
    chosen = {e.name for e in report if e.eligible}
    if not chosen:
        reasons = "; ".join(f"'{e.name}': {e.reason}" for e in report) or "no affine layer"
        raise ValueError(
            f"No layer of model '{model.name}' can take the layer-sparsity penalty "
            f"({reasons})."
        )

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name in chosen:
            config = _with_penalty(layer, config, regularizer)
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    copy = LayerSparseModel(
        clone.inputs if len(clone.inputs) > 1 else clone.inputs[0],
        clone.outputs if len(clone.outputs) > 1 else clone.outputs[0],
        name=model.name,
    )
    for original, new in zip(_weighted_layers(model), _weighted_layers(copy)):
        new.set_weights(original.get_weights())
    return (copy, report) if return_report else copy


def _weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]
