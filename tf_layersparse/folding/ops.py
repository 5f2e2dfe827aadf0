"""What each Keras layer means to the folder.

Every node of a model graph becomes one or two `Op`s: an affine map
(`Dense`, convolutions; a layer's built-in activation is split off into its
own op), an activation, an identity at inference (`Dropout`, ...), or an
opaque op that folding keeps as it is. The tables below say which
activations are the identity on [0, inf) and which produce outputs >= 0.
"""

import dataclasses
from typing import Any, Optional

import keras
import numpy as np

from tf_layersparse.folding.merge import geometry as merge_geometry
from tf_layersparse.graph import Ref

__all__ = ["ActivationSpec", "Op", "activation_spec", "node_ops"]

# identity on [0, inf): f(x) = x for every x >= 0
_IDENTITY_ON_NONNEGATIVE = {"relu", "leaky_relu", "elu", "linear"}
# f(x) >= 0 for every x
_NONNEGATIVE_OUTPUT = {
    "relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "softplus",
    "exponential",
}

IDENTITY_AT_INFERENCE = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
)

# Layers whose output is >= 0 whenever all their inputs are >= 0. They stop
# a merge (they are not affine maps of the kind we merge) but carry the
# non-negativity that makes a later ReLU removable.
_KEEPS_NONNEGATIVE = tuple(
    getattr(keras.layers, name)
    for name in (
        "Flatten", "Reshape", "Permute", "RepeatVector",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D",
        "UpSampling1D", "UpSampling2D", "UpSampling3D",
        "Concatenate", "Add", "Multiply", "Maximum", "Minimum", "Average",
    )
    if hasattr(keras.layers, name)
)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """How an activation behaves on the half line and on its outputs."""

    name: str
    identity_on_nonnegative: bool
    nonnegative_output: bool

    @property
    def identity(self):
        return self.name == "linear"


def _named(name):
    return ActivationSpec(
        name,
        name in _IDENTITY_ON_NONNEGATIVE,
        name in _NONNEGATIVE_OUTPUT,
    )


def activation_spec(layer_or_name) -> Optional[ActivationSpec]:
    """`ActivationSpec` of an activation name or activation layer, else None.

    Example:

    >>> activation_spec("relu").identity_on_nonnegative
    True
    >>> activation_spec(keras.layers.ReLU(max_value=6.0)).identity_on_nonnegative
    False
    """
    if isinstance(layer_or_name, str):
        return _named(layer_or_name)
    layer = layer_or_name
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        slope = float(config.get("negative_slope") or 0.0)
        threshold = float(config.get("threshold") or 0.0)
        return ActivationSpec(
            "relu",
            config.get("max_value") is None and threshold == 0.0,
            slope == 0.0 and threshold >= 0.0,
        )
    if isinstance(layer, keras.layers.LeakyReLU):
        slope = float(layer.get_config().get("negative_slope", 0.3))
        return ActivationSpec("leaky_relu", True, slope == 0.0)
    if isinstance(layer, (keras.layers.ELU, keras.layers.PReLU)):
        return ActivationSpec(type(layer).__name__.lower(), True, False)
    if isinstance(layer, keras.layers.Softmax):
        return ActivationSpec("softmax", False, True)
    if isinstance(layer, keras.layers.Activation):
        name = layer.get_config().get("activation")
        return _named(name) if isinstance(name, str) else ActivationSpec(
            repr(name), False, False
        )
    return None


@dataclasses.dataclass
class Op:
    """One step of the normalised graph.

    `kind` is "affine", "activation", "identity" or "opaque". An affine op
    carries its weights as float64 arrays and `members`, the original layers
    it stands for (more than one after merges). An activation split off an
    affine layer has `inline=True`.
    """

    kind: str
    node: Any
    inputs: list
    output: int
    activation: Optional[ActivationSpec] = None
    inline: bool = False
    kernel: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    members: list = dataclasses.field(default_factory=list)
    input_shape: Any = None
    output_shape: Any = None
    template: Any = None  # layer whose config the rebuilt layer starts from
    overrides: dict = dataclasses.field(default_factory=dict)
    geometry: Any = None  # (padding, strides, dilation) of a convolution
    exact: bool = True
    effective: Any = None  # (kernel, bias) after BatchNorm folding, before merges

    @property
    def layer(self):
        return self.node.layer

    @property
    def name(self):
        return self.node.layer.name


AFFINE_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


def affine_weights(layer):
    """(kernel, bias) of a supported affine layer as float64, else None."""
    if type(layer) in AFFINE_TYPES:
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        if layer.use_bias:
            bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
        else:
            bias = np.zeros(kernel.shape[-1])
        return kernel, bias
    return None


def _inline_activation(layer):
    name = layer.get_config().get("activation", "linear")
    if isinstance(name, str):
        return _named(name)
    return ActivationSpec(repr(name), False, False)


def node_ops(node, input_shape, new_key):
    """Split one graph node into its ops; `new_key()` mints tensor keys."""
    layer = node.layer
    # one tensor in, one out; other keyword arguments (Keras records
    # `training=False` for Dropout) do not change the inference function
    single = (
        len(node.outputs) == 1
        and len(node.inputs) == 1
        and len(node.args) == 1
        and isinstance(node.args[0], Ref)
    )
    if single:
        weights = affine_weights(layer)
        if weights is not None:
            spec = _inline_activation(layer)
            affine_out = node.outputs[0] if spec.identity else new_key()
            affine = Op(
                "affine", node, list(node.inputs), affine_out,
                kernel=weights[0], bias=weights[1], members=[layer],
                input_shape=input_shape, output_shape=node.shapes[0],
                template=layer,
                geometry=None if type(layer) is keras.layers.Dense
                else merge_geometry(layer),
            )
            if spec.identity:
                return [affine]
            act = Op(
                "activation", node, [affine_out], node.outputs[0],
                activation=spec, inline=True,
            )
            return [affine, act]
        if isinstance(layer, keras.layers.BatchNormalization):
            return [Op("batchnorm", node, list(node.inputs), node.outputs[0])]
        if isinstance(layer, IDENTITY_AT_INFERENCE):
            return [Op("identity", node, list(node.inputs), node.outputs[0])]
        spec = activation_spec(layer)
        if spec is not None:
            return [
                Op("activation", node, list(node.inputs), node.outputs[0],
                   activation=spec)
            ]
    return [Op("opaque", node, list(node.inputs), None)]


def keeps_nonnegative(layer):
    """True if `layer` maps inputs >= 0 to outputs >= 0."""
    return isinstance(layer, _KEEPS_NONNEGATIVE)


def ends_in_nonnegative_activation(layer):
    """True if `layer` has a built-in activation whose outputs are >= 0."""
    name = layer.get_config().get("activation") if hasattr(layer, "get_config") else None
    return isinstance(name, str) and _named(name).nonnegative_output
