"""Which layers are active, which fold, and why."""

import keras
import numpy as np

from tf_layersparse.folding.plan import LayerReport, plan_fold
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


def _penalised_norm(layer):
    total = 0.0
    for attr in ("kernel", "bias"):
        regularizer = getattr(layer, f"{attr}_regularizer", None)
        variable = getattr(layer, attr, None)
        if isinstance(regularizer, LayerSparsity) and variable is not None:
            value = keras.ops.convert_to_numpy(variable).astype(np.float64)
            total += float(np.sum(np.minimum(value, 0.0) ** 2))
    return float(np.sqrt(total))


def negative_part_norms(model):
    """`{layer name: norm of the negative part of its penalised weights}`.

    The norm is taken over kernel and bias together (Section 2.5 of the
    paper); a layer is inactive when it is exactly 0.

    Example:

    >>> import keras, tf_layersparse as ls
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     2, kernel_initializer="ones", name="d",
    ...     kernel_regularizer=ls.LayerSparsity(0.1))])
    >>> negative_part_norms(model)
    {'d': 0.0}
    """
    return {layer.name: _penalised_norm(layer) for layer in regularized_layers(model)}


def active_layer_count(model, tolerance=0.0):
    """Number of penalised layers whose negative-part norm exceeds `tolerance`."""
    return sum(norm > tolerance for norm in negative_part_norms(model).values())


def layer_report(model, *, nonnegative_inputs=False, policy="depth"):
    """Per-layer report: active or not, negative-part norm, foldable and why.

    Each entry is a `LayerStatus` with `name`, `class_name`, `active`,
    `negative_norm` (kernel and bias together), `regularized`, `foldable`,
    `action` ("merged", "removed", "removed-activation", "kept") and a
    human-readable `reason`. `print(report)` shows a table.

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
