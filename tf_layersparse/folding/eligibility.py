"""Which affine layers the layer-sparsity penalty applies to, and why.

A layer (or block) is eligible when its activation is ReLU-type (the
identity on [0, inf)) and its input is provably >= 0: then an effective
kernel and bias without negative entries make the activation the identity
and the layer inactive.

A *block* is an affine layer (Dense, Conv1D/2D/3D, DepthwiseConv1D/2D,
SeparableConv1D/2D) followed by a BatchNormalization on its channel axis
and then a ReLU-type activation. At inference BatchNormalization is affine
per channel, so the block is one affine map with kernel
`W * gamma / sqrt(var + eps)` and bias `beta + gamma * (b - mean) /
sqrt(var + eps)`; a channel with negative `gamma` flips the sign of its
kernel column, so the block is judged on these effective weights, never on
`W` alone. `Eligibility.batchnorm` names the BatchNormalization and
`Eligibility.activation` the layer applying the activation.

A capped ReLU (`ReLU(max_value=...)`, relu6) is the identity only on
[0, cap]; fold cannot prove the block's outputs stay below the cap, so such
blocks are not eligible.
"""

import dataclasses
from typing import Optional

import keras

from tf_layersparse.folding.plan import nonnegative_tensors
from tf_layersparse.registry import (
    activation_name,
    activation_rule,
    batchnorm_on_channels,
    is_affine,
    is_identity_at_inference,
)
from tf_layersparse.graph import model_graph

__all__ = ["Eligibility", "eligible_layers"]


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Whether `apply_layer_sparsity` penalises a layer, and why.

    `batchnorm` is the name of the BatchNormalization folded into the layer
    (its block), or None; `activation` the name of the layer applying the
    ReLU-type activation (the layer itself for an inline activation), or
    None when no activation follows.
    """

    name: str
    class_name: str
    eligible: bool
    reason: str
    batchnorm: Optional[str] = None
    activation: Optional[str] = None


def _single_reader(graph_readers, key, output_keys):
    readers = graph_readers.get(key, [])
    if len(readers) != 1 or key in output_keys:
        return None
    node = readers[0]
    return node if len(node.inputs) == 1 and len(node.outputs) == 1 else None


def _block_tail(node, readers, output_keys):
    """(BatchNormalization node or None, activation node or None, problem)
    following an affine node with a linear inline activation."""
    key, batchnorm = node.outputs[0], None
    while True:
        nxt = _single_reader(readers, key, output_keys)
        if nxt is None:
            return batchnorm, None, None
        layer = nxt.layer
        if is_identity_at_inference(layer):
            key = nxt.outputs[0]
            continue
        if isinstance(layer, keras.layers.BatchNormalization) and batchnorm is None:
            if not batchnorm_on_channels(layer, node.layer, node.shapes[0]):
                return nxt, None, (
                    f"BatchNormalization '{layer.name}' does not normalise "
                    f"the channel axis of '{node.layer.name}'"
                )
            batchnorm, key = nxt, nxt.outputs[0]
            continue
        if activation_rule(layer) is not None:
            return batchnorm, nxt, None
        return batchnorm, None, None


def _activation_reason(rule):
    if rule.capped:
        return (f"activation '{rule.name}' is capped: it is the identity only on "
                "[0, cap], and fold cannot prove the outputs stay below the cap")
    if not rule.identity_on_nonnegative:
        return f"activation '{rule.name}' is not the identity on [0, inf)"
    if rule.linear:
        return "no ReLU-type activation follows it (linear layers fold without a penalty)"
    return ""


def eligible_layers(model, nonnegative_inputs=False):
    """For every affine layer of `model`, whether the penalty applies.

    A `Dense`, `Conv1D/2D/3D`, `DepthwiseConv1D/2D` or `SeparableConv1D/2D`
    layer is eligible when its activation is ReLU-type (the identity on
    [0, inf), uncapped, not linear), its input is provably >= 0, and a
    BatchNormalization between it and its activation (a block) normalises
    its channel axis.

    Example:

    >>> import keras
    >>> from tf_layersparse.folding import eligible_layers
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="first"),
    ...     keras.layers.Dense(4, name="hidden"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ...     keras.layers.ReLU(name="act"),
    ...     keras.layers.Dense(1, name="out")])
    >>> [(e.name, e.eligible, e.batchnorm, e.activation)
    ...  for e in eligible_layers(model)]  # doctest: +NORMALIZE_WHITESPACE
    [('first', False, None, 'first'), ('hidden', True, 'bn', 'act'),
     ('out', False, None, None)]
    """
    graph = model_graph(model)
    nonneg = nonnegative_tensors(model, nonnegative_inputs, graph=graph)
    readers = graph.consumers()
    output_keys = set(graph.outputs)
    uses = graph.layer_uses()
    result = []
    for node in graph.nodes:
        layer = node.layer
        if not is_affine(layer):
            continue
        name, cls = layer.name, type(layer).__name__
        if uses[id(layer)] > 1:
            result.append(Eligibility(name, cls, False,
                                      f"shared layer (called {uses[id(layer)]} times)"))
            continue
        inline = activation_rule(activation_name(layer))
        batchnorm = act_node = problem = None
        if inline is not None and not inline.linear:
            act_name, rule = name, inline
        else:
            batchnorm, act_node, problem = _block_tail(node, readers, output_keys)
            act_name = act_node.layer.name if act_node is not None else None
            rule = activation_rule(act_node.layer) if act_node is not None else None
        bn_name = batchnorm.layer.name if batchnorm is not None else None
        if problem:
            reason = problem
        elif rule is None:
            reason = "no ReLU-type activation follows it (linear layers fold without a penalty)"
        else:
            reason = _activation_reason(rule)
        if not reason and not nonneg.get(node.inputs[0], False):
            reason = ("its input may be negative (declare nonnegative_inputs=True "
                      "for pixel-like model inputs)")
        ok = not reason
        if ok:
            reason = f"ReLU-type '{rule.name}' after a non-negative input"
            if bn_name:
                reason += f"; judged on effective weights with '{bn_name}' folded in"
        result.append(Eligibility(name, cls, ok, reason, bn_name,
                                  act_name if rule is not None else None))
    return result
