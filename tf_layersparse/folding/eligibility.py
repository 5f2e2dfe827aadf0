"""Which affine layers the layer-sparsity penalty applies to, and why.

A layer is eligible when its activation is ReLU-type (the identity on
[0, inf)) and its input is provably >= 0: then a kernel and bias without
negative entries make the activation the identity and the layer inactive.
"""

import dataclasses

from tf_layersparse.folding.plan import (
    _fold_batchnorm,
    _nonnegativity_pass,
    _normalise,
    _normalise_flags,
)
from tf_layersparse.graph import model_graph

__all__ = ["Eligibility", "eligible_layers"]


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Whether `apply_layer_sparsity` penalises a layer, and why."""

    name: str
    class_name: str
    eligible: bool
    reason: str


def _following_activation(op, readers):
    """The activation op applied to an affine op's output, if any, and
    whether a BatchNormalization stands between them."""
    key, batchnorm = op.output, False
    while True:
        nxt = readers.get(key, [])
        if len(nxt) != 1:
            return None, batchnorm
        nxt = nxt[0]
        if nxt.kind in ("identity", "batchnorm"):
            batchnorm = batchnorm or nxt.kind == "batchnorm"
            key = nxt.output
            continue
        return (nxt if nxt.kind == "activation" else None), batchnorm


def eligible_layers(model, nonnegative_inputs=False):
    """For every affine layer of `model`, whether the penalty applies.

    A `Dense` or `Conv1D/2D/3D` layer is eligible when its activation is
    ReLU-type (the identity on [0, inf) but not linear), its input is
    provably >= 0, and no BatchNormalization sits between it and its
    activation.

    Example:

    >>> import keras
    >>> from tf_layersparse.folding import eligible_layers
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="first"),
    ...     keras.layers.Dense(4, activation="relu", name="hidden"),
    ...     keras.layers.Dense(1, name="out")])
    >>> [(e.name, e.eligible) for e in eligible_layers(model)]
    [('first', False), ('hidden', True), ('out', False)]
    """
    graph = model_graph(model)
    ops_list, opaque = _normalise(graph)
    bn_alias, bn_removed = _fold_batchnorm(graph, ops_list)
    nonneg, _, _ = _nonnegativity_pass(
        graph, ops_list, _normalise_flags(graph, nonnegative_inputs), bn_alias, bn_removed
    )
    readers = {}
    for op in ops_list:
        for key in op.inputs:
            readers.setdefault(key, []).append(op)
    result = []
    for op in ops_list:
        if op.kind == "opaque" and op.layer.name in opaque:
            result.append(Eligibility(op.name, type(op.layer).__name__, False,
                                      opaque[op.layer.name]))
        if op.kind != "affine":
            continue
        act, batchnorm = _following_activation(op, readers)
        if act is None:
            reason = "no ReLU-type activation follows it (linear layers fold without a penalty)"
        elif not act.activation.identity_on_nonnegative:
            reason = f"activation '{act.activation.name}' is not the identity on [0, inf)"
        elif not nonneg.get(op.inputs[0], False):
            reason = "its input may be negative (declare nonnegative_inputs=True for pixel-like model inputs)"
        elif batchnorm:
            reason = ("BatchNormalization follows it: a penalty on the raw kernel "
                      "does not control the effective (normalised) weights")
        else:
            reason = ""
        result.append(Eligibility(op.name, type(op.layer).__name__, not reason,
                                  reason or f"ReLU-type '{act.activation.name}' after a non-negative input"))
    return result
