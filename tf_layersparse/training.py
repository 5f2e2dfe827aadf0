"""Training with exact zeros: a model that takes proximal steps.

Keras minimises a regularizer by its (sub)gradient. For the layer-sparsity
penalty that only makes a layer's negative part hover near zero. The model
below instead runs proximal gradient descent: the optimizer steps on the data
loss, then each penalised tensor gets the proximal step of its penalty,
inside the same compiled train step.
"""

import keras
from keras import ops

from tf_layersparse.folding.eligibility import eligible_layers
from tf_layersparse.regularizers import (
    LayerSparsity,
    snap_negative_part,
    validate_strength,
)

__all__ = ["LayerSparseModel", "apply_layer_sparsity"]


@keras.saving.register_keras_serializable(package="tf_layersparse")
class LayerSparseModel(keras.Model):
    """Functional model whose train step makes inactive layers exact.

    After every optimizer update, each trainable tensor carrying a
    `LayerSparsity(strength, proximal=True)` regularizer is replaced by its
    proximal step: the norm of its negative part shrinks by
    `learning_rate * strength` and reaches exactly 0 below that. With plain
    SGD this is proximal gradient descent on `loss + penalty`, so layers end
    with kernel and bias minima exactly >= 0.

    Adaptive optimizers (Adam, RMSprop, ...) scale each coordinate's step,
    so the proximal step with the base learning rate is only a heuristic
    there: layers get close to, but may not reach, zero negative part. For
    them set `snap_tolerance`: after every step, a penalised tensor whose
    negative-part norm is at most `snap_tolerance` has its negative entries
    set to 0 (pair it with `LayerSparsity(proximal=False)` so the penalty's
    gradient reaches the optimizer; `apply_layer_sparsity(...,
    proximal=False, snap_tolerance=...)` does that).

    Build it like a Functional model, or let `apply_layer_sparsity` do it.
    Gradient accumulation is not supported. TensorFlow backend only.

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> inputs = keras.Input((2,))
    >>> h = keras.layers.Dense(5, activation="relu")(inputs)
    >>> h = keras.layers.Dense(5, activation="relu",
    ...     kernel_regularizer=ls.LayerSparsity(0.5, proximal=True),
    ...     bias_regularizer=ls.LayerSparsity(0.5, proximal=True))(h)
    >>> model = ls.LayerSparseModel(inputs, keras.layers.Dense(1)(h))
    >>> model.compile(keras.optimizers.SGD(0.1), "mse")
    >>> _ = model.fit(np.ones((8, 2)), np.ones((8, 1)), epochs=50, verbose=0)
    >>> bool(np.min(model.layers[2].kernel.numpy()) >= 0)
    True
    """

    # *args/**kwargs keep Keras' Functional (de)serialization for the subclass
    def __init__(self, *args, snap_tolerance=0.0, **kwargs):
        if keras.backend.backend() != "tensorflow":
            raise NotImplementedError(
                "LayerSparseModel implements its proximal step for the "
                f"TensorFlow backend; the active backend is "
                f"'{keras.backend.backend()}'."
            )
        super().__init__(*args, **kwargs)
        self.snap_tolerance = validate_strength(snap_tolerance, "snap_tolerance")

    def get_config(self):
        config = super().get_config()
        config["snap_tolerance"] = self.snap_tolerance
        return config

    def penalised_variables(self):
        """(variable, LayerSparsity) pairs this model steps on."""
        return [
            (v, v.regularizer)
            for v in self.trainable_variables
            if isinstance(v.regularizer, LayerSparsity)
        ]

    def sparsity_step(self, learning_rate):
        """Apply the proximal step (and snap) to every penalised tensor."""
        for variable, regularizer in self.penalised_variables():
            value = variable.value
            if regularizer.proximal:
                value = regularizer.prox(value, ops.cast(learning_rate, value.dtype))
            if self.snap_tolerance > 0:
                value = snap_negative_part(value, self.snap_tolerance)
            if regularizer.proximal or self.snap_tolerance > 0:
                variable.assign(value)

    def train_step(self, data):
        if getattr(self.optimizer, "gradient_accumulation_steps", None):
            raise ValueError(
                f"LayerSparseModel '{self.name}' does not support gradient "
                "accumulation: its proximal step follows every train step."
            )
        # Read before the update: a schedule gives this step's learning rate.
        learning_rate = ops.convert_to_tensor(self.optimizer.learning_rate)
        logs = super().train_step(data)
        self.sparsity_step(learning_rate)
        return logs


def apply_layer_sparsity(
    model,
    strength,
    *,
    nonnegative_inputs=False,
    proximal=True,
    snap_tolerance=0.0,
    return_report=False,
):
    """Return a copy of `model` that trains with the layer-sparsity penalty.

    Every eligible layer (see `eligible_layers`) gets
    `LayerSparsity(strength)` as kernel and bias regularizer; the copy is a
    `LayerSparseModel`, which takes the penalty's proximal step after each
    update so that inactive layers become exactly non-negative. Weights are
    copied; `model` itself is left untouched. Compile the copy as usual.

    Args:
        model: a built Sequential or Functional model.
        strength: finite float >= 0, the tuning parameter.
        nonnegative_inputs: True if the model inputs are >= 0 (pixels), so
            that the first layer is eligible too.
        proximal: use proximal steps (True, best with SGD) or plain
            subgradients (False; combine with `snap_tolerance` for Adam).
        snap_tolerance: set a tensor's negative part to 0 when its norm is
            at most this after a step (0 disables).
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
    strength = validate_strength(strength)
    snap_tolerance = validate_strength(snap_tolerance, "snap_tolerance")
    report = eligible_layers(model, nonnegative_inputs)
    chosen = {e.name for e in report if e.eligible}
    regularizer = LayerSparsity(strength, proximal=proximal)

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name in chosen:
            config["kernel_regularizer"] = keras.saving.serialize_keras_object(regularizer)
            if getattr(layer, "use_bias", False):
                config["bias_regularizer"] = keras.saving.serialize_keras_object(regularizer)
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    copy = LayerSparseModel(
        clone.inputs if len(clone.inputs) > 1 else clone.inputs[0],
        clone.outputs if len(clone.outputs) > 1 else clone.outputs[0],
        snap_tolerance=snap_tolerance,
        name=model.name,
    )
    for original, new in zip(_weighted_layers(model), _weighted_layers(copy)):
        new.set_weights(original.get_weights())
    return (copy, report) if return_report else copy


def _weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]
