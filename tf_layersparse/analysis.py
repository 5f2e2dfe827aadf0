"""Which layers are active, which fold, and why."""

import keras
import numpy as np

from tf_layersparse.folding.plan import plan_fold
from tf_layersparse.folding.report import LayerReport
from tf_layersparse.proximal import sparsity_groups
from tf_layersparse.regularizers import LayerSparsity

__all__ = [
    "LayerReport",
    "active_layer_count",
    "layer_report",
    "negative_part_norms",
    "regularized_layers",
]


def regularized_layers(model):
    """Layers of `model` (nested models included) carrying `LayerSparsity`."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(regularized_layers(layer))
        elif any(
            isinstance(getattr(layer, attr, None), LayerSparsity)
            for attr in ("kernel_regularizer", "bias_regularizer")
        ):
            found.append(layer)
    return found


def negative_part_norms(model, groups=None):
    """`{layer name: norm of the negative part of its penalised weights}`.

    The norm is taken over all penalised tensors of a layer together (kernel
    and bias, Section 2.5 of the paper); for a block whose layer feeds a
    BatchNormalization it is the norm of the block's effective (BN-folded)
    kernel and bias under the moving statistics. A layer is inactive when
    it is exactly 0. Non-finite weights give NaN, which never counts as
    inactive. `groups` (from `tf_layersparse.proximal.sparsity_groups`)
    saves finding them again.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     2, kernel_initializer="ones", name="d",
    ...     kernel_regularizer=ls.LayerSparsity(0.1))])
    >>> negative_part_norms(model)
    {'d': 0.0}
    """
    squares = {}
    for group in sparsity_groups(model) if groups is None else groups:
        squares[group.name] = squares.get(group.name, 0.0) + group.negative_norm() ** 2
    return {name: float(np.sqrt(total)) for name, total in squares.items()}


def active_layer_count(model, tolerance=0.0):
    """Number of penalised layers whose negative-part norm exceeds `tolerance`.

    Layers with non-finite weights count as active.
    """
    return sum(not norm <= tolerance for norm in negative_part_norms(model).values())


def layer_report(model, *, nonnegative_inputs=False, policy="cost"):
    """Per-layer report: active or not, negative-part norm, foldable and why.

    Each entry is a `LayerStatus` with `name`, `class_name`, `active`,
    `negative_norm` (of the effective kernel and bias together: a block's
    BatchNormalization folded in), `regularized`, `foldable`, `action`
    ("merged", "removed", "removed-activation", "kept"), `block` (the
    affine layer, BatchNormalization and activation of a block, named
    together) and a human-readable `reason`. `print(report)` shows a table.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu"),
    ...     keras.layers.Dense(4, activation="relu", kernel_initializer="ones"),
    ...     keras.layers.Dense(1, name="out")])
    >>> [s.foldable for s in layer_report(model)]
    [False, True, False]
    """
    plan = plan_fold(model, nonnegative_inputs=nonnegative_inputs, policy=policy)
    return LayerReport(plan.statuses.values())
