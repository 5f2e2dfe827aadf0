"""Size of a model: depth, parameters and FLOPs."""

import dataclasses

import keras

from tf_layersparse.folding.merge import affine_cost
from tf_layersparse.graph import model_graph

__all__ = ["ModelCost", "model_cost"]

_AFFINE = tuple(
    getattr(keras.layers, name)
    for name in ("Dense", "Conv1D", "Conv2D", "Conv3D")
)


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


def model_cost(model):
    """Return the `ModelCost` of a Sequential or Functional model.

    FLOPs count 2 per multiply-accumulate of Dense and ConvND layers.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model_cost(model)
    ModelCost(depth=1, layers=1, params=8, flops=12)
    """
    graph = model_graph(model)
    depth = flops = 0
    for node in graph.nodes:
        layer = node.layer
        if isinstance(layer, _AFFINE):
            depth += 1
            flops += affine_cost(
                tuple(layer.kernel.shape), node.shapes[0], layer.use_bias
            )[1]
    layers = len({id(node.layer) for node in graph.nodes})
    return ModelCost(depth, layers, int(model.count_params()), int(flops))
