"""The layer-sparsity penalty and its proximal step.

The penalty of one weight tensor `w` is `strength * ||min(w, 0)||_F`, the
Frobenius norm of its negative part (not squared). Like the group lasso, the
norm is not differentiable where the negative part vanishes, which is what
lets whole tensors reach "no negative entry" exactly, but only when the
penalty is handled by its proximal operator rather than by its subgradient.
"""

import math

import keras
from keras import ops

__all__ = [
    "LayerSparsity",
    "negative_part_norm",
    "layer_sparsity_prox",
    "snap_negative_part",
]


def _safe_norm(x, axis=None):
    # sqrt has an infinite derivative at 0; a tensor without negative entries
    # (zero-initialised biases, inactive layers) must still get a finite,
    # zero gradient, so the square root only ever sees positive arguments.
    squared = ops.sum(ops.square(x), axis=axis, keepdims=axis is not None)
    positive = squared > 0
    safe = ops.where(positive, squared, ops.ones_like(squared))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squared))


def negative_part_norm(x, axis=None):
    """Frobenius norm of `min(x, 0)`, with a finite gradient everywhere.

    `axis` (a tuple) takes the norm over those axes only, keeping them with
    size 1: a stack of independent tensors along axis 0 uses
    `axis=tuple(range(1, x.ndim))`.

    Example:

    >>> float(negative_part_norm(keras.ops.convert_to_tensor([3.0, -4.0, 0.0])))
    4.0
    """
    x = ops.convert_to_tensor(x)
    return _safe_norm(ops.minimum(x, ops.zeros_like(x)), axis)


def layer_sparsity_prox(x, threshold, axis=None):
    """Proximal operator of `threshold * ||min(x, 0)||_F`.

    Non-negative entries are left alone; the negative part is scaled so that
    its norm shrinks by `threshold`, and set to exactly zero when its norm is
    at most `threshold`. With `axis`, each slice over the other axes is its
    own group and `threshold` broadcasts against the kept axes.

    Example:

    >>> x = keras.ops.convert_to_tensor([1.0, -3.0, -4.0])
    >>> keras.ops.convert_to_numpy(layer_sparsity_prox(x, 2.5)).tolist()
    [1.0, -1.5, -2.0]
    >>> keras.ops.convert_to_numpy(layer_sparsity_prox(x, 5.0)).tolist()
    [1.0, 0.0, 0.0]
    >>> stack = keras.ops.convert_to_tensor([[1.0, -3.0, -4.0], [1.0, -0.3, -0.4]])
    >>> keras.ops.convert_to_numpy(layer_sparsity_prox(stack, 2.5, axis=(1,)))[:, 1].tolist()
    [-1.5, 0.0]
    """
    x = ops.convert_to_tensor(x)
    negative = ops.minimum(x, ops.zeros_like(x))
    norm = _safe_norm(negative, axis)
    threshold = ops.convert_to_tensor(threshold, dtype=x.dtype)
    keep = norm > threshold
    shrunk = 1 - threshold / ops.where(keep, norm, ops.ones_like(norm))
    scale = ops.where(keep, shrunk, ops.zeros_like(norm))
    return x - negative + scale * negative


def snap_negative_part(x, tolerance):
    """Set the negative part of `x` to exactly 0 if its norm is <= `tolerance`.

    Meant for adaptive optimizers (Adam, RMSprop, ...), whose per-coordinate
    step sizes make the proximal step only approximate: their iterates hover
    near, but not at, a layer with no negative entry.

    Example:

    >>> x = keras.ops.convert_to_tensor([1.0, -1e-4])
    >>> keras.ops.convert_to_numpy(snap_negative_part(x, 1e-3)).tolist()
    [1.0, 0.0]
    """
    x = ops.convert_to_tensor(x)
    small = negative_part_norm(x) <= ops.convert_to_tensor(tolerance, dtype=x.dtype)
    return ops.where(small, ops.maximum(x, ops.zeros_like(x)), x)


def validate_strength(value, name="strength"):
    """Return `value` as a float, or raise if it is negative or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a real number, got {value!r} "
            f"({type(value).__name__})."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be finite and >= 0, got {value!r}."
        )
    return value


@keras.saving.register_keras_serializable(package="tf_layersparse")
class LayerSparsity(keras.regularizers.Regularizer):
    """Layer-sparsity penalty `strength * ||min(w, 0)||_F`.

    Pass it as `kernel_regularizer=` and `bias_regularizer=` of a `Dense` or
    convolution layer that follows a ReLU. A layer whose kernel and bias have
    no negative entry is *inactive*: its ReLU acts as the identity, and
    `tf_layersparse.fold` merges it into the next layer.

    Used on its own, Keras minimises the penalty by its subgradient, which
    drives the negative part close to zero but rarely to exactly zero. Models
    made by `tf_layersparse.apply_layer_sparsity` take proximal steps instead
    (`proximal=True`): the penalty is still reported in the loss, but its
    gradient is stopped and, after every optimizer update, the negative part
    is shrunk by `learning_rate * strength` and set to exactly zero below it.

    Args:
        strength: finite, non-negative float, the tuning parameter `r_L`.
        proximal: if True, the penalty contributes no gradient; only a
            `tf_layersparse.LayerSparseModel` then acts on it.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> layer = keras.layers.Dense(
    ...     4, activation="relu",
    ...     kernel_regularizer=ls.LayerSparsity(0.1),
    ...     bias_regularizer=ls.LayerSparsity(0.1))
    >>> float(ls.LayerSparsity(0.5)(keras.ops.convert_to_tensor([[3.0, -4.0]])))
    2.0
    """

    def __init__(self, strength=0.01, proximal=False):
        self.strength = validate_strength(strength)
        self.proximal = bool(proximal)

    def __call__(self, x):
        penalty = self.strength * negative_part_norm(x)
        if self.proximal:
            return ops.stop_gradient(penalty)
        return penalty

    def prox(self, x, learning_rate):
        """Proximal step for one update of size `learning_rate`."""
        return layer_sparsity_prox(x, learning_rate * self.strength)

    def get_config(self):
        return {"strength": self.strength, "proximal": self.proximal}

    def __repr__(self):
        return (
            f"LayerSparsity(strength={self.strength}, "
            f"proximal={self.proximal})"
        )
