"""A uniform, read-only view of Sequential and Functional models as graphs.

Folding rewrites a model node by node. Sequential and Functional models store
their structure differently; this module turns both into one list of `Node`s
in topological order, whose tensors are named by integer keys.
"""

import dataclasses
from typing import Any

import keras

__all__ = ["Graph", "Node", "Ref", "model_graph"]

try:  # Keras does not export the Functional class itself.
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover - exercised only on other Keras layouts
    _Functional = None


@dataclasses.dataclass(frozen=True)
class Ref:
    """Placeholder for a tensor inside a node's call arguments."""

    key: int


@dataclasses.dataclass
class Node:
    """One call of one layer: `outputs = layer(*args, **kwargs)`."""

    layer: Any
    args: tuple
    kwargs: dict
    inputs: list  # keys of the input tensors, in argument order
    outputs: list  # keys of the output tensors
    shapes: list  # shapes of the output tensors
    input_shapes: list = dataclasses.field(default_factory=list)  # of `inputs`

    @property
    def input(self):
        """Key of the single input tensor (raises on multi-input nodes)."""
        if len(self.inputs) != 1:
            raise ValueError(f"layer '{self.layer.name}' has several inputs")
        return self.inputs[0]


@dataclasses.dataclass
class Graph:
    """Nodes in topological order plus the model's input and output keys."""

    name: str
    sequential: bool
    inputs: list  # keys
    input_specs: list  # (name, batch_shape, dtype) per input
    outputs: list  # keys
    output_structure: Any  # model.outputs structure with Refs in place
    nodes: list

    def consumers(self):
        """Map each tensor key to the nodes that read it."""
        readers = {}
        for node in self.nodes:
            for key in node.inputs:
                readers.setdefault(key, []).append(node)
        return readers

    def producers(self):
        """Map each tensor key to the node that computes it."""
        return {key: node for node in self.nodes for key in node.outputs}

    def layer_uses(self):
        """Number of nodes that call each layer (by id); > 1 means shared."""
        uses = {}
        for node in self.nodes:
            uses[id(node.layer)] = uses.get(id(node.layer), 0) + 1
        return uses


def _check_model(model):
    if isinstance(model, keras.Sequential):
        return True
    if _Functional is not None and isinstance(model, _Functional):
        return False
    if isinstance(model, keras.Model):
        raise TypeError(
            f"Model '{model.name}' is a subclassed model "
            f"({type(model).__name__}); its call() is Python code that "
            "tf_layersparse cannot inspect. Build it as a Sequential or "
            "Functional model."
        )
    raise TypeError(
        f"Expected a keras.Model, got {type(model).__name__}."
    )


def _input_spec(tensor):
    layer = tensor._keras_history.operation
    return (layer.name, tuple(tensor.shape), tensor.dtype)


def _require_built(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model '{model.name}' has no defined input yet. Build it first, "
            "e.g. with `keras.Input(shape)` as its first layer or "
            "`model.build(input_shape)`."
        )
    return inputs


def _output_shapes(layer, spec):
    """Output shapes of `layer` on the symbolic input `spec`, from Keras'
    own symbolic inference (which runs `call` when a layer has no
    `compute_output_shape`); no node is recorded on the layer."""
    out = layer.compute_output_spec(spec)
    return out, [tuple(t.shape) for t in keras.tree.flatten(out)]


def _sequential_graph(model):
    inputs = _require_built(model)
    key = 0
    nodes = []
    spec = keras.KerasTensor(inputs[0].shape, dtype=inputs[0].dtype)
    for layer in model.layers:
        try:
            spec, shapes = _output_shapes(layer, spec)
        except Exception as error:  # noqa: BLE001 - re-raised with the layer named
            raise ValueError(
                f"Cannot infer the output shape of layer '{layer.name}' "
                f"({type(layer).__name__}) in model '{model.name}': {error}"
            ) from error
        in_shape = tuple(nodes[-1].shapes[0]) if nodes else tuple(inputs[0].shape)
        nodes.append(Node(layer, (Ref(key),), {}, [key], [key + 1], shapes[:1], [in_shape]))
        key += 1
    return Graph(
        name=model.name,
        sequential=True,
        inputs=[0],
        input_specs=[_input_spec(inputs[0])],
        outputs=[key],
        output_structure=Ref(key),
        nodes=nodes,
    )


def _functional_graph(model):
    inputs = _require_built(model)

    def refs(structure):
        return keras.tree.map_structure(
            lambda t: Ref(id(t)) if isinstance(t, keras.KerasTensor) else t,
            structure,
        )

    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            args, kwargs = node.arguments.args, node.arguments.kwargs
            nodes.append(
                Node(
                    layer=node.operation,
                    args=refs(tuple(args)),
                    kwargs=refs(dict(kwargs)),
                    inputs=[id(t) for t in node.arguments.keras_tensors],
                    outputs=[id(t) for t in node.outputs],
                    shapes=[tuple(t.shape) for t in node.outputs],
                    input_shapes=[tuple(t.shape) for t in node.arguments.keras_tensors],
                )
            )
    return Graph(
        name=model.name,
        sequential=False,
        inputs=[id(t) for t in model.inputs],
        input_specs=[_input_spec(t) for t in model.inputs],
        outputs=[id(t) for t in keras.tree.flatten(model.outputs)],
        output_structure=refs(model._outputs_struct),
        nodes=nodes,
    )


def model_graph(model):
    """Return the `Graph` of a built Sequential or Functional model.

    Raises `TypeError` for subclassed models and `ValueError` for models
    whose input shape is not known yet.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [node.layer.name for node in model_graph(model).nodes] == [
    ...     model.layers[0].name]
    True
    """
    if _check_model(model):
        return _sequential_graph(model)
    return _functional_graph(model)
