"""Size of a model: depth, parameters and FLOPs.

FLOPs count 2 per multiply-accumulate of the affine layers (Dense, grouped,
depthwise and separable convolutions counted by what they compute) and 2
per output element of an inference-form BatchNormalization (a scale and a
shift), so that folding a BatchNormalization away shows as a saving, and 1
per output element of a `BiasMap` (an addition). A `BiasMap`'s parameters
are its compact table; the full map it expands for speed is derived.
"""

import dataclasses
import math

from tf_layersparse.graph import model_graph
from tf_layersparse.registry import AFFINE, BATCHNORM, BIAS_MAP, affine_form, rule_for

__all__ = ["ModelCost", "affine_cost", "model_cost"]


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Depth (affine layers), Keras layers, parameters, FLOPs per example."""

    depth: int
    layers: int
    params: int
    flops: int

    def __str__(self):
        return (
            f"{self.depth} affine layers, {self.layers} layers, "
            f"{self.params:,} parameters, {self.flops:,} FLOPs/example"
        )


def _positions(output_shape, channels_first=False):
    spatial = output_shape[2:] if channels_first else output_shape[1:-1]
    return math.prod(d for d in spatial if d is not None)


def affine_cost(form, kernel_shape, output_shape, with_bias, groups=1,
                pointwise_shape=None, channels_first=False):
    """(parameters, FLOPs per example) of one affine layer.

    `form` is "dense", "conv" (kernel `(k..., c_in / groups, c_out)`),
    "depthwise" (kernel `(k..., c, multiplier)`) or "separable" (plus
    `pointwise_shape` `(c * multiplier, c_out)`).

    Example:

    >>> affine_cost("conv", (3, 3, 8, 8), (None, 4, 4, 8), True)
    (584, 18432)
    >>> affine_cost("depthwise", (3, 3, 8, 1), (None, 4, 4, 8), False)
    (72, 2304)
    """
    positions = _positions(output_shape, channels_first)
    macs = math.prod(kernel_shape)  # per output position, all forms but dense
    params = math.prod(kernel_shape)
    if form == "dense":
        units = kernel_shape[-1]
    elif form == "depthwise":
        units = kernel_shape[-2] * kernel_shape[-1]
    elif form == "separable":
        units = pointwise_shape[-1]
        macs += math.prod(pointwise_shape)
        params += math.prod(pointwise_shape)
    else:
        units = kernel_shape[-1]
    if with_bias:
        params += units
    return int(params), int(2 * macs * positions)


def _layer_form(layer):
    """(form, kernel shape, pointwise shape, groups), from variable shapes
    only: reading the values of a ResNet's weights would take seconds."""
    form = affine_form(layer)
    if form == "separable":
        pointwise = tuple(layer.pointwise_kernel.shape)
        return form, tuple(layer.depthwise_kernel.shape), pointwise[-2:], 1
    groups = getattr(layer, "groups", 1) if form == "conv" else 1
    return form, tuple(layer.kernel.shape), None, groups


def model_cost(model):
    """Return the `ModelCost` of a Sequential or Functional model.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model_cost(model)
    ModelCost(depth=1, layers=1, params=8, flops=12)
    """
    graph = model_graph(model)
    depth = flops = 0
    derived = {}  # id(layer) -> size of weights computed from its parameters
    for node in graph.nodes:
        layer = node.layer
        kind = rule_for(layer).kind
        channels_first = getattr(layer, "data_format", None) == "channels_first"
        if kind == AFFINE:
            depth += 1
            form, kernel_shape, pointwise_shape, groups = _layer_form(layer)
            flops += affine_cost(form, kernel_shape, node.shapes[0], False, groups,
                                 pointwise_shape, channels_first)[1]
        elif kind == BATCHNORM:
            flops += 2 * math.prod(d for d in node.shapes[0][1:] if d is not None)
        elif kind == BIAS_MAP:
            flops += math.prod(d for d in node.shapes[0][1:] if d is not None)
            full = getattr(layer, "full_map", None)
            if full is not None:
                derived[id(layer)] = math.prod(full.shape)
    layers = len({id(node.layer) for node in graph.nodes})
    params = model.count_params() - sum(derived.values())
    return ModelCost(depth, layers, int(params), int(flops))
