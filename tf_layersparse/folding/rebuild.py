"""Build a new Keras model from a `FoldPlan`.

Merged layers are new layers holding the merged float64 weights rounded to
their dtype; a merge with a bias map becomes the convolution without bias
followed by a `BiasMap` (and its activation, when it had one, after that). Every other layer is carried over: re-created from its config
with a copy of its weights (and `finalize_state`, so that an adapted
`Normalization` keeps its statistics); raw `keras.ops` operations, which
hold no state, and layers that cannot be re-created are reused as they are.
The user's model is only read.
"""

import keras
import numpy as np

from tf_layersparse import registry
from tf_layersparse.folding.merge import bias_map_table
from tf_layersparse.graph import Ref
from tf_layersparse.layers import BiasMap
from tf_layersparse.regularizers import LayerSparsity

__all__ = ["rebuild"]

_REGULARIZER_KEYS = ("kernel_regularizer", "bias_regularizer", "depthwise_regularizer",
                     "pointwise_regularizer")
_CLASSES = {
    ("dense", 0): keras.layers.Dense,
    ("conv", 1): keras.layers.Conv1D,
    ("conv", 2): keras.layers.Conv2D,
    ("conv", 3): keras.layers.Conv3D,
    ("depthwise", 1): keras.layers.DepthwiseConv1D,
    ("depthwise", 2): keras.layers.DepthwiseConv2D,
    ("separable", 1): keras.layers.SeparableConv1D,
    ("separable", 2): keras.layers.SeparableConv2D,
}


@keras.saving.register_keras_serializable(package="tf_layersparse", name="HostZeros")
class _HostZeros(keras.initializers.Initializer):
    """Zeros made by numpy: placeholders for weights set right after.

    `keras.initializers.Zeros` is a backend op, which JAX compiles for
    every new shape (a tenth of a second each); an array put on the device
    becomes a variable without one.
    """

    def __call__(self, shape, dtype=None):
        zeros = np.zeros(shape, dtype=keras.backend.standardize_dtype(dtype))
        if keras.backend.backend() == "jax":  # jnp.asarray would compile a copy
            import jax

            return jax.device_put(zeros)
        return zeros


def _zero_initializers(cls, config):
    """`config` with zeros initializers, and the initializers it had.

    Weights are set right after building; drawing random initial values
    first would cost seconds on a ResNet. The originals go back on the
    layer afterwards (`_restore_initializers`), so that re-initialising the
    folded model (`refit`, `clone_model`) draws as the user's model did.
    Only for Keras' own layers, whose `*_initializer` entries are known to
    be initializers.
    """
    originals = {}
    if cls.__module__.startswith("keras."):
        for key in config:
            # an initializer the layer exposes as a read-only property
            # (LSTM: its cell's) could not be put back: leave it as it is
            if key.endswith("_initializer") and not isinstance(
                    getattr(cls, key, None), property):
                originals[key] = config[key]
                config[key] = _HostZeros()
    return config, originals


def _restore_initializers(layer, originals):
    for key, value in originals.items():
        if hasattr(layer, key):
            setattr(layer, key, keras.initializers.get(value))


def _without_layer_sparsity(layer, config):
    # The folded model is the result of the penalty, not a model to train
    # with it; other regularizers the user chose stay.
    for key in _REGULARIZER_KEYS:
        if isinstance(getattr(layer, key, None), LayerSparsity):
            config[key] = None
    return config


def _merged_layer(segment, activation):
    """A new layer computing `segment.affine`, then `activation`."""
    affine, last = segment.affine, segment.last.layer
    rank = 0 if affine.form == "dense" else affine.rank
    cls = _CLASSES[(affine.form, rank)]
    has_bias = affine.bias_map is None and bool(
        any(getattr(s.layer, "use_bias", False) for s in segment.steps) or np.any(affine.bias))
    config = dict(name=last.name, activation=activation, use_bias=has_bias,
                  dtype=last.dtype_policy)
    if affine.form == "dense":
        config["units"] = int(affine.kernel.shape[-1])
    else:
        padding, strides, dilation = affine.geometry
        config.update(kernel_size=affine.spatial, padding=padding, strides=strides,
                      dilation_rate=dilation,
                      data_format="channels_first" if affine.channels_first else "channels_last")
        if affine.form == "conv":
            config.update(filters=int(affine.kernel.shape[-1]), groups=affine.groups)
        elif affine.form == "depthwise":
            config["depth_multiplier"] = int(affine.kernel.shape[-1])
        else:
            config.update(filters=int(affine.pointwise.shape[-1]),
                          depth_multiplier=int(affine.kernel.shape[-1]))
    if type(last) is cls:  # keep the user's other settings (regularizers, ...)
        base = _without_layer_sparsity(last, last.get_config())
        base.update(config)
        config = base
    config, originals = _zero_initializers(cls, config)
    return cls.from_config(config), has_bias, originals


def _unique(name, names):
    candidate, n = name, 1
    while candidate in names:
        candidate, n = f"{name}_{n}", n + 1
    names.add(candidate)
    return candidate


def _bias_map_layers(affine, conv, activation, names):
    """The `BiasMap` after a merged convolution (and its activation)."""
    table, repeat_at = bias_map_table(affine.bias_map)
    layers = [BiasMap(shape=affine.bias_map.shape[:-1], channels=affine.bias_map.shape[-1],
                      repeat_at=repeat_at, table_shape=table.shape[:-1],
                      name=_unique(f"{conv.name}_bias_map", names), dtype=conv.dtype_policy)]
    if activation != "linear":
        layers.append(keras.layers.Activation(
            activation, name=_unique(f"{conv.name}_activation", names),
            dtype=conv.dtype_policy))
    return layers


def _affine_weights(layer, affine, has_bias):
    affine = affine.materialized()
    dtype = keras.backend.standardize_dtype(layer.weights[0].dtype)
    if affine.form == "separable":
        weights = [affine.kernel, affine.pointwise.reshape((1,) * affine.rank
                                                           + affine.pointwise.shape)]
    else:
        weights = [affine.kernel]
    if has_bias:
        weights.append(affine.bias)
    return [np.asarray(w, dtype=dtype) for w in weights]


def _clone(layer):
    """A copy of `layer` to be called and given its weights, or `layer`
    itself when it holds no weights it could lose or cannot be re-created."""
    if not isinstance(layer, keras.layers.Layer):
        return layer, {}  # a raw keras.ops operation: stateless
    if isinstance(layer, keras.Model):
        try:
            return keras.models.clone_model(layer), {}
        except Exception:  # noqa: BLE001 - fall back to sharing the layer
            return layer, {}
    try:
        config = _without_layer_sparsity(layer, layer.get_config())
        config, originals = _zero_initializers(type(layer), config)
        return type(layer).from_config(config), originals
    except Exception:  # noqa: BLE001 - custom layers without from_config support
        return layer, {}


def _copy_state(clone, original, originals):
    if clone is original:
        return
    clone.set_weights(original.get_weights())
    _restore_initializers(clone, originals)
    finalize = getattr(clone, "finalize_state", None)
    if callable(finalize):
        finalize()


def rebuild(plan):
    """Return the folded model described by `plan`.

    Example:

    >>> import keras
    >>> from tf_layersparse.folding.plan import plan_fold
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(1)])
    >>> len(rebuild(plan_fold(model, policy="depth")).layers)
    1
    """
    graph = plan.graph
    tensors, new_inputs = {}, []
    for key, (name, shape, dtype) in zip(graph.inputs, graph.input_specs):
        tensors[key] = keras.Input(batch_shape=shape, dtype=dtype, name=name)
        new_inputs.append(tensors[key])

    def fill(structure):
        return keras.tree.map_structure(
            lambda a: tensors[plan.resolve(a.key)] if isinstance(a, Ref) else a, structure)

    inline = {}  # id(affine step) -> its kept built-in activation step
    for step in plan.kept:
        if step.kind == registry.ACTIVATION and step.inline:
            inline[id(step.node)] = step
    clones, sequence, done = {}, [], set()
    names = {node.layer.name for node in graph.nodes if hasattr(node.layer, "name")}
    for step in plan.kept:
        if id(step) in done:
            continue
        if step.kind == registry.AFFINE:
            segment = plan.segments[id(step)]
            act = inline.get(id(step.node))
            function = act.layer.activation if act is not None else "linear"
            with_map = segment.affine.bias_map is not None
            layer, has_bias, originals = _merged_layer(
                segment, "linear" if with_map else function)
            out = layer(tensors[plan.resolve(segment.input)])
            layer.set_weights(_affine_weights(layer, segment.affine, has_bias))
            _restore_initializers(layer, originals)
            sequence.append(layer)
            if with_map:
                for extra in _bias_map_layers(segment.affine, layer, function, names):
                    out = extra(out)
                    sequence.append(extra)
                    if isinstance(extra, BiasMap):
                        extra.set_weights([np.asarray(bias_map_table(
                            segment.affine.bias_map)[0], dtype=extra.weights[0].dtype)])
            tensors[step.outputs[0]] = out
            if act is not None:
                tensors[act.outputs[0]] = out
                done.add(id(act))
            continue
        original = step.layer
        first_use = id(original) not in clones
        if first_use:
            clones[id(original)] = _clone(original)
        layer, originals = clones[id(original)]
        outputs = layer(*fill(step.node.args), **fill(step.node.kwargs))
        if first_use:
            _copy_state(layer, original, originals)
            sequence.append(layer)
        for key, tensor in zip(step.node.outputs, keras.tree.flatten(outputs)):
            tensors[key] = tensor
    if graph.sequential:
        return keras.Sequential([new_inputs[0], *sequence], name=graph.name)
    outputs = fill(graph.output_structure)
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs=inputs, outputs=outputs, name=graph.name)
