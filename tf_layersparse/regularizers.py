"""The layer-sparsity penalty and its proximal step.

The penalty of one weight tensor `w` is `strength * ||min(w, 0)||_F`, the
Frobenius norm of its negative part (not squared). Like the group lasso, the
norm is not differentiable where the negative part vanishes, which is what
lets whole tensors reach "no negative entry" exactly, but only when the
penalty is handled by its proximal operator rather than by its subgradient.
"""

import math

import keras
import numpy as np
from keras import ops
try:  # no public name in Keras 3; what makes Keras save the target's state with the weights
    from keras.src.saving.keras_saveable import KerasSaveable
except ImportError:  # a Keras that moved it: the state is not saved, a resumed target warns
    KerasSaveable = object

__all__ = [
    "LayerSparsity",
    "group_prox",
    "negative_part_norm",
    "layer_sparsity_prox",
    "snap_negative_part",
]


def negative_part(x):
    """`min(x, 0)` in the dtype of `x`.

    (`keras.ops.minimum` returns float32 for float64 tensors on the torch
    backend of Keras 3.15; `where` keeps the dtype.)
    """
    return ops.where(x < 0, x, ops.zeros_like(x))


def positive_part(x):
    """`max(x, 0)` in the dtype of `x`."""
    return ops.where(x > 0, x, ops.zeros_like(x))


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
    return _safe_norm(negative_part(x), axis)


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
    negative = negative_part(x)
    norm = _safe_norm(negative, axis)
    threshold = ops.convert_to_tensor(threshold, dtype=x.dtype)
    keep = norm > threshold
    shrunk = 1 - threshold / ops.where(keep, norm, ops.ones_like(norm))
    scale = ops.where(keep, shrunk, ops.zeros_like(norm))
    return _scale_negatives(x, scale)


def _scale_negatives(x, scale):
    # selects, not `x - min(x, 0) + scale * min(x, 0)`: compilers may
    # reassociate that sum, and a zeroed entry then comes out as +-1e-11;
    # a zeroed entry is +0.0, not the -0.0 of `0 * x`
    shrunk = ops.where(scale > 0, scale * x, ops.zeros_like(x))
    return ops.where(x < 0, shrunk, x)


def _as(x, dtype):
    # Python numbers straight to `dtype`: a detour through float32 would round them
    if isinstance(x, (int, float)):
        return ops.convert_to_tensor(x, dtype=dtype)
    return ops.cast(x, dtype)


def _group_norm(tensors):
    return _safe_norm(ops.concatenate([ops.reshape(t, (-1,)) for t in tensors]))


def group_prox(values, step_sizes, strength, iterations=6):
    """Proximal step of `strength * ||min(w, 0)||` over a group of tensors.

    `values` are the tensors of one group (a layer's kernel and bias, say)
    right after an optimizer update, and `step_sizes` the step their
    coordinates just took per unit gradient: one scalar for all (SGD's
    learning rate), or a list with one entry per tensor, each a scalar or a
    tensor of per-coordinate steps (Adam's `lr_t / (sqrt(v) + eps)`). The result minimises

        sum_i (w_i - z_i)^2 / (2 step_i) + strength * ||min(w, 0)||_F,

    the proximal step in the optimizer's own metric. Entries >= 0 stay; the
    negative part is scaled entry-wise by `rho / (rho + step_i * strength)`,
    `rho` being its new norm, and is exactly 0 when
    `||min(z, 0) / step|| <= strength`. With one scalar step this is the
    closed-form group-lasso shrinkage; otherwise `rho` solves
    `||min(z, 0) / (rho + step * strength)|| = 1` by `iterations` Newton
    steps on `1 / ||...|| - 1`, which is nearly linear in `rho` (exactly
    so for equal steps) and reaches float64 precision within 5 steps from
    `rho = 0` (3,000 random groups with steps spread over 6 decades);
    unrolled, they cost far less per update than a bisection loop.

    Example:

    >>> z = [keras.ops.convert_to_tensor([1.0, -3.0]), keras.ops.convert_to_tensor([-4.0])]
    >>> [keras.ops.convert_to_numpy(t).tolist() for t in group_prox(z, 0.5, 5.0)]
    [[1.0, -1.5], [-2.0]]
    >>> [keras.ops.convert_to_numpy(t).tolist() for t in group_prox(z, 1.0, 5.0)]
    [[1.0, 0.0], [0.0]]
    >>> steps = [keras.ops.convert_to_tensor([1.0, 1.0]), keras.ops.convert_to_tensor([1e-3])]
    >>> out = group_prox(z, steps, 2.0)
    >>> round(float(keras.ops.convert_to_numpy(out[1])[0]), 3)  # tiny step: barely moves
    -3.998
    """
    values = [ops.convert_to_tensor(v) for v in values]
    dtype = values[0].dtype
    strength = _as(strength, dtype)
    negatives = [negative_part(v) for v in values]
    if not isinstance(step_sizes, (list, tuple)):
        # one step for every coordinate: the closed-form shrinkage, in as
        # few ops as possible since it runs after every update (norm 0 gives
        # threshold / tiny >= 1, hence scale 0, and no 0/0)
        threshold = _as(step_sizes, dtype) * strength
        norm = ops.sqrt(sum(ops.sum(n * n) for n in negatives))
        tiny = float(np.finfo(keras.backend.standardize_dtype(dtype)).tiny)
        scale = positive_part(1 - threshold / ops.where(norm > tiny, norm, _as(tiny, dtype)))
        return [_scale_negatives(v, scale) for v in values]
    norm = ops.sqrt(sum(ops.sum(n * n) for n in negatives))
    steps = [_as(s, dtype) for s in step_sizes]
    steps = [s + ops.zeros_like(v) for s, v in zip(steps, values)]
    # zero iff the subgradient condition ||min(z, 0) / step|| <= strength holds
    scaled = ops.sqrt(sum(ops.sum(ops.square(n / s)) for n, s in zip(negatives, steps)))
    zero = scaled <= strength
    # strength 0 is the identity; a stand-in keeps the iteration finite
    penalised = strength > 0
    lam = ops.where(penalised, strength, ops.ones_like(strength))
    one = ops.ones_like(norm)
    # the root lies in [||n|| - max(s) lam, ||n|| - min(s) lam]; from its
    # lower end the iteration is exact at once when all steps are equal
    largest = ops.max(ops.stack([ops.max(s) for s in steps]))
    rho = ops.maximum(norm - largest * lam, ops.zeros_like(norm))
    for _ in range(iterations):
        # phi(rho) = ||n / (rho + s lam)||; Newton on 1/phi - 1 = 0
        shifted = [rho + s * lam for s in steps]
        phi_sq = sum(ops.sum(ops.square(n / d)) for n, d in zip(negatives, shifted))
        slope = sum(ops.sum(ops.square(n / d) / d) for n, d in zip(negatives, shifted))
        phi = ops.sqrt(phi_sq)
        usable = ops.logical_and(ops.logical_and(phi > 0, slope > 0),
                                 ops.logical_and(ops.isfinite(phi), ops.isfinite(slope)))
        phi = ops.where(usable, phi, one)
        slope = ops.where(usable, slope, one)
        step = (1 / phi - 1) * phi * phi_sq / slope  # psi / psi', psi' = slope / phi^3
        rho = ops.minimum(ops.maximum(rho - ops.where(usable, step, ops.zeros_like(step)),
                                      ops.zeros_like(rho)), norm)
    result = []
    for v, s in zip(values, steps):
        factor = ops.where(zero, ops.zeros_like(s), rho / (rho + s * lam))
        factor = ops.where(penalised, factor, ops.ones_like(factor))
        result.append(_scale_negatives(v, factor))
    return result


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
    return ops.where(small, positive_part(x), x)


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


GROUPS = ("tensor", "layer")
BLOCK_STEPS = ("effective", "raw")


@keras.saving.register_keras_serializable(package="tf_layersparse")
class LayerSparsity(keras.regularizers.Regularizer, KerasSaveable):
    """Layer-sparsity penalty `strength * ||min(w, 0)||_F`.

    Pass it as `kernel_regularizer=` and `bias_regularizer=` of a `Dense` or
    convolution layer that follows a ReLU. A layer whose kernel and bias have
    no negative entry is *inactive*: its ReLU acts as the identity, and
    `tf_layersparse.fold` merges it into the next layer.

    Train with `callbacks=[tf_layersparse.ActiveLayers()]` (or a model made
    by `apply_layer_sparsity`, which adds the callback itself): after every
    optimizer update the negative part then takes its proximal step, which
    shrinks its norm by the step size times `strength` and sets it to
    exactly zero below that. While that runs, the penalty adds nothing to
    the loss and its gradient (the proximal step is where it acts; the
    callback logs `active_layers` and, with `log_norms`, the norms).
    Without the callback, Keras minimises the penalty by its subgradient,
    which brings the negative part close to zero but rarely to zero.

    Args:
        strength: finite, non-negative float, the tuning parameter `r_L`.
        proximal: if False, the callback leaves this tensor to its
            subgradient (and to the optional snap) instead of taking
            proximal steps.
        group: "tensor" (default) penalises each tensor on its own; "layer"
            puts a layer's kernel and bias in one norm, as the paper does
            (Section 2.5). Read from the kernel's regularizer.
        snap_tolerance: after every step, a group whose negative-part norm
            is at most this has its negative entries set to 0 (0 disables);
            meant for `proximal=False`, where the subgradient only brings
            the norm near 0.
        block_step: how a layer followed by BatchNormalization is stepped,
            "raw" (default) or "effective"; see `tf_layersparse.proximal`.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> layer = keras.layers.Dense(
    ...     4, activation="relu",
    ...     kernel_regularizer=ls.LayerSparsity(0.1),
    ...     bias_regularizer=ls.LayerSparsity(0.1))
    >>> float(ls.LayerSparsity(0.5)(keras.ops.convert_to_tensor([[3.0, -4.0]])))
    2.0
    """

    def __init__(self, strength=0.01, proximal=True, group="tensor", snap_tolerance=0.0,
                 block_step="raw"):
        self.strength = validate_strength(strength)
        self.proximal = bool(proximal)
        if group not in GROUPS:
            raise ValueError(f"`group` must be one of {GROUPS}, got {group!r}.")
        self.group = group
        self.snap_tolerance = validate_strength(snap_tolerance, "snap_tolerance")
        if block_step not in BLOCK_STEPS:
            raise ValueError(f"`block_step` must be one of {BLOCK_STEPS}, got {block_step!r}.")
        self.block_step = block_step
        # set by tf_layersparse.proximal.ProximalSteps while it steps on
        # this penalty; not part of the config
        self._driven = False
        # a depth target's state (JSON text), kept with the weights so that
        # a run resumed from a checkpoint takes the same decisions; a
        # callable while `ActiveLayers` runs (asked for the state at saving)
        self.target_state = None

    # Keras saves the state of every KerasSaveable attribute of a layer with
    # its weights (`save_weights`, `BackupAndRestore`, `ModelCheckpoint`,
    # `model.save`) and reads it back into the new model's regularizers.
    def _obj_type(self):
        return "Loss"  # the saveable kind whose attributes Keras walks: none of ours

    __reduce__ = object.__reduce__  # pickle and copy as a plain object, not as a model

    def save_own_variables(self, store):
        state = self.target_state() if callable(self.target_state) else self.target_state
        if state:
            store["target_state"] = np.frombuffer(state.encode("utf-8"), dtype=np.uint8)

    def load_own_variables(self, store):
        if "target_state" in store:
            self.target_state = np.asarray(store["target_state"], np.uint8).tobytes().decode(
                "utf-8")

    def __call__(self, x):
        if self._driven:
            # the proximal step acts on the penalty; computing it in every
            # train step only to show it in the loss would cost time
            return ops.zeros((), dtype=x.dtype)
        return self.strength * negative_part_norm(x)

    def get_config(self):
        return {
            "strength": self.strength,
            "proximal": self.proximal,
            "group": self.group,
            "snap_tolerance": self.snap_tolerance,
            "block_step": self.block_step,
        }

    def __repr__(self):
        return f"LayerSparsity({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"
