"""Build a new Keras model from a `FoldPlan`.

Every layer of the result is new: kept layers are re-created from their
config and given copies of their weights, merged layers get the merged
weights. The user's model is only read.
"""

import keras
import numpy as np

from tf_layersparse.graph import Ref
from tf_layersparse.regularizers import LayerSparsity

__all__ = ["rebuild"]

_REGULARIZER_KEYS = ("kernel_regularizer", "bias_regularizer")


def _without_layer_sparsity(layer, config):
    # The folded model is the result of the penalty, not a model to train
    # with it; other regularizers the user chose stay.
    for key in _REGULARIZER_KEYS:
        if isinstance(getattr(layer, key, None), LayerSparsity):
            config[key] = None
    return config


def _affine_layer(op, activation_op):
    last, template = op.members[-1], op.template
    config = _without_layer_sparsity(template, template.get_config())
    config.update(op.overrides)
    config["name"] = last.name
    config["activation"] = (
        last.get_config()["activation"] if activation_op is not None else "linear"
    )
    if isinstance(template, keras.layers.Dense):
        config["units"] = int(op.kernel.shape[-1])
    has_bias = any(getattr(m, "use_bias", True) for m in op.members) or bool(
        np.any(op.bias)
    )
    config["use_bias"] = has_bias
    return template.__class__.from_config(config), has_bias


def _set_affine_weights(layer, op, has_bias):
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    weights = [np.asarray(op.kernel, dtype=dtype)]
    if has_bias:
        weights.append(np.asarray(op.bias, dtype=dtype))
    layer.set_weights(weights)


def _clone(layer):
    if isinstance(layer, keras.Model):
        clone = keras.models.clone_model(layer)
    else:
        clone = layer.__class__.from_config(
            _without_layer_sparsity(layer, layer.get_config())
        )
    return clone


def rebuild(plan):
    """Return the folded model described by `plan`."""
    graph = plan.graph
    tensors, new_inputs = {}, []
    for key, (name, shape, dtype) in zip(graph.inputs, graph.input_specs):
        tensor = keras.Input(batch_shape=shape, dtype=dtype, name=name)
        tensors[key] = tensor
        new_inputs.append(tensor)

    def fill(structure):
        return keras.tree.map_structure(
            lambda a: tensors[plan.resolve(a.key)] if isinstance(a, Ref) else a,
            structure,
        )

    affine_by_output = {op.output: op for op in plan.kept if op.kind == "affine"}
    inline = {}
    for op in plan.kept:
        if op.kind == "activation" and op.inline:
            producer = affine_by_output.get(op.inputs[0])
            if producer is not None and producer.members[-1] is op.layer:
                inline[id(producer)] = op

    clones, sequence, done = {}, [], set()
    for op in plan.kept:
        if id(op) in done:
            continue
        if op.kind == "affine":
            act = inline.get(id(op))
            layer, has_bias = _affine_layer(op, act)
            out = layer(tensors[op.inputs[0]])
            _set_affine_weights(layer, op, has_bias)
            tensors[op.output] = out
            if act is not None:
                tensors[act.output] = out
                done.add(id(act))
            sequence.append(layer)
        elif op.kind == "activation" and op.inline:
            # an activation whose own affine layer was merged away
            layer = keras.layers.Activation(
                op.layer.get_config()["activation"],
                name=f"{op.layer.name}_activation",
            )
            tensors[op.output] = layer(tensors[op.inputs[0]])
            sequence.append(layer)
        else:
            original = op.layer
            first_use = id(original) not in clones
            if first_use:
                clones[id(original)] = _clone(original)
            layer = clones[id(original)]
            outputs = layer(*fill(op.node.args), **fill(op.node.kwargs))
            if first_use:
                layer.set_weights(original.get_weights())
                sequence.append(layer)
            for key, tensor in zip(op.node.outputs, keras.tree.flatten(outputs)):
                tensors[key] = tensor

    if graph.sequential:
        return keras.Sequential([new_inputs[0], *sequence], name=graph.name)
    outputs = fill(graph.output_structure)
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs=inputs, outputs=outputs, name=graph.name)
