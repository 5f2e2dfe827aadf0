"""What every Keras layer type means to layer sparsity: one table, one query.

`rule_for(layer)` answers, for any layer or raw operation of a model graph,
which of these it is:

- ``AFFINE``: Dense, Conv1D/2D/3D (grouped too), DepthwiseConv1D/2D and
  SeparableConv1D/2D; their weights are read as float64 by `read_affine`.
- ``BATCHNORM``: BatchNormalization, affine per channel at inference.
- ``ACTIVATION``: an element-wise activation, with `ActivationRule` saying
  whether it is the identity on [0, inf) and whether its outputs are >= 0.
- ``IDENTITY``: the identity at inference (Dropout, GaussianNoise, ...).
- ``PASSTHROUGH``: maps inputs >= 0 to outputs >= 0 (pooling, Flatten,
  Concatenate, nearest/bilinear upsampling, ...) but is not merged.
- ``BIAS_MAP``: adds a constant tensor (the `BiasMap` a fold makes at
  'same' borders): carried over, never merged again.
- ``OPAQUE``: everything else, including raw `keras.ops` operations and
  layer types nobody registered: carried over as it is, nothing assumed.

Rules are looked up by exact class, so a subclass (which may override
`call`) is opaque until registered. `register(cls, rule)` adds user layers.
The folder, `model_cost`, `eligible_layers` and `layer_report` all read
this table; it imports nothing else from the package.
"""

import dataclasses
from typing import Callable, Optional, Union

import keras
import numpy as np

__all__ = [
    "AFFINE",
    "ACTIVATION",
    "BATCHNORM",
    "BIAS_MAP",
    "IDENTITY",
    "OPAQUE",
    "PASSTHROUGH",
    "ActivationRule",
    "Rule",
    "activation_name",
    "activation_rule",
    "affine_form",
    "affine_geometry",
    "batchnorm_on_channels",
    "batchnorm_scale_shift",
    "channel_axis",
    "is_affine",
    "is_identity_at_inference",
    "read_affine_weights",
    "register",
    "rule_for",
]

AFFINE = "affine"
ACTIVATION = "activation"
BATCHNORM = "batchnorm"
IDENTITY = "identity"
PASSTHROUGH = "passthrough"
BIAS_MAP = "bias_map"
OPAQUE = "opaque"


@dataclasses.dataclass(frozen=True)
class ActivationRule:
    """How an activation behaves on [0, inf) and on its outputs.

    `capped` marks a ReLU with a `max_value` (relu6): the identity only on
    [0, cap], which fold cannot prove its inputs stay in.
    """

    name: str
    identity_on_nonnegative: bool
    nonnegative_output: bool
    capped: bool = False

    @property
    def linear(self):
        return self.name == "linear"


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one layer is to the folder; `reason` says why when opaque."""

    kind: str
    activation: Optional[ActivationRule] = None
    reason: str = ""


# activation name -> (identity on [0, inf), outputs >= 0, capped)
_ACTIVATIONS = {
    "linear": (True, False, False),
    "relu": (True, True, False),
    "leaky_relu": (True, False, False),
    "elu": (True, False, False),
    "relu6": (False, True, True),
    "sigmoid": (False, True, False),
    "hard_sigmoid": (False, True, False),
    "softmax": (False, True, False),
    "log_softmax": (False, False, False),
    "softplus": (False, True, False),
    "exponential": (False, True, False),
}


def _named_activation(name):
    if not isinstance(name, str):
        return ActivationRule(repr(name), False, False)
    return ActivationRule(name, *_ACTIVATIONS.get(name, (False, False, False)))


def _relu_layer(layer):
    config = layer.get_config()
    slope = float(config.get("negative_slope") or 0.0)
    threshold = float(config.get("threshold") or 0.0)
    capped = config.get("max_value") is not None
    name = "relu" if not capped else f"relu(max_value={config['max_value']})"
    return ActivationRule(
        name,
        threshold == 0.0 and not capped,
        slope == 0.0 and threshold >= 0.0,
        capped,
    )


def _activation_layer_rule(layer):
    if isinstance(layer, keras.layers.ReLU):
        return _relu_layer(layer)
    if isinstance(layer, keras.layers.LeakyReLU):
        slope = float(layer.get_config().get("negative_slope", 0.3))
        return ActivationRule("leaky_relu", True, slope == 0.0)
    if isinstance(layer, (keras.layers.ELU, keras.layers.PReLU)):
        return ActivationRule(type(layer).__name__.lower(), True, False)
    if isinstance(layer, keras.layers.Softmax):
        return ActivationRule("softmax", False, True)
    return _named_activation(layer.get_config().get("activation"))


def activation_rule(layer_or_name) -> Optional[ActivationRule]:
    """`ActivationRule` of an activation name or activation layer, else None.

    Example:

    >>> activation_rule("relu").identity_on_nonnegative
    True
    >>> activation_rule(keras.layers.ReLU(max_value=6.0)).capped
    True
    >>> activation_rule(keras.layers.Dense(2)) is None
    True
    """
    if layer_or_name is None or isinstance(layer_or_name, str):
        return _named_activation(layer_or_name or "linear")
    rule = rule_for(layer_or_name)
    return rule.activation if rule.kind == ACTIVATION else None


def activation_name(layer):
    """Name of an affine layer's built-in activation ("linear" when none),
    read without serialising the layer; a custom function gets its repr,
    which no rule treats as an identity.

    Example:

    >>> activation_name(keras.layers.Dense(2, activation="relu"))
    'relu'
    """
    fn = getattr(layer, "activation", None)
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", None)
    try:
        if isinstance(name, str) and keras.activations.get(name) is fn:
            return name
    except (ValueError, TypeError):
        pass
    return repr(fn)


def channel_axis(layer):
    """Channel axis (-1 or 1) of an affine layer's output."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def affine_geometry(layer):
    """(padding, strides, dilation) of a convolution, None for Dense."""
    if type(layer) is keras.layers.Dense:
        return None
    return (layer.padding, tuple(layer.strides), tuple(layer.dilation_rate))


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def _numpy64(variable):
    return keras.ops.convert_to_numpy(variable).astype(np.float64)


def affine_form(layer):
    """"dense", "conv", "depthwise" or "separable" for an affine layer.

    Example:

    >>> affine_form(keras.layers.SeparableConv2D(2, 3))
    'separable'
    """
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "depthwise"
    return "dense" if type(layer) is keras.layers.Dense else "conv"


def read_affine_weights(layer):
    """`(form, kernel, pointwise, bias)` of an affine layer: kernels in the
    layer's dtype (copied to float64 only when merged), bias in float64.

    `form` is "dense", "conv" (kernel `(k..., c_in / groups, c_out)`),
    "depthwise" (kernel `(k..., c, multiplier)`) or "separable" (depthwise
    kernel plus pointwise `(c * multiplier, c_out)`). A missing bias is 0.

    Example:

    >>> layer = keras.layers.Dense(2, kernel_initializer="ones")
    >>> layer.build((None, 3))
    >>> form, kernel, _, bias = read_affine_weights(layer)
    >>> form, kernel.shape, bias.tolist()
    ('dense', (3, 2), [0.0, 0.0])
    """
    pointwise = None
    form = affine_form(layer)
    if form == "separable":
        kernel = _numpy(layer.depthwise_kernel)
        pointwise = _numpy(layer.pointwise_kernel)
        pointwise = pointwise.reshape(pointwise.shape[-2:])
    else:
        kernel = _numpy(layer.kernel)
    units = pointwise.shape[-1] if pointwise is not None else (
        kernel.shape[-1] * kernel.shape[-2] if form == "depthwise" else kernel.shape[-1])
    bias = _numpy64(layer.bias) if getattr(layer, "use_bias", False) else np.zeros(units)
    return form, kernel, pointwise, bias


def batchnorm_on_channels(batchnorm, affine_layer, output_shape):
    """True if `batchnorm` normalises exactly the channel axis of the
    output of `affine_layer` (shape `output_shape`)."""
    axis = batchnorm.axis
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1:
        return False
    rank = len(output_shape)
    want = channel_axis(affine_layer) % rank
    return axes[0] % rank == want


def batchnorm_scale_shift(layer):
    """Inference form of a BatchNormalization: `y = x * scale + shift`.

    Example:

    >>> bn = keras.layers.BatchNormalization(epsilon=0.0)
    >>> bn.build((None, 2))
    >>> [a.tolist() for a in batchnorm_scale_shift(bn)]
    [[1.0, 1.0], [0.0, 0.0]]
    """
    mean, var = _numpy64(layer.moving_mean), _numpy64(layer.moving_variance)
    gamma = _numpy64(layer.gamma) if layer.gamma is not None else np.ones_like(mean)
    beta = _numpy64(layer.beta) if layer.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + layer.epsilon)
    return scale, beta - mean * scale


def _affine_rule(layer):
    return Rule(AFFINE)


def _conv_rule(layer):
    return Rule(AFFINE)


def _batchnorm_rule(layer):
    if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
        return Rule(OPAQUE, reason="BatchNormalization with renorm/synchronized")
    return Rule(BATCHNORM)


def _activation(layer):
    return Rule(ACTIVATION, activation=_activation_layer_rule(layer))


def _passthrough(layer):
    return Rule(PASSTHROUGH)


def _upsampling(layer):
    interpolation = layer.get_config().get("interpolation", "nearest")
    if interpolation in ("nearest", "bilinear"):
        return Rule(PASSTHROUGH)
    return Rule(OPAQUE, reason=(
        f"'{interpolation}' interpolation can turn inputs >= 0 into negative outputs"))


def _identity(layer):
    return Rule(IDENTITY)


_TABLE: dict = {}


def register(layer_class, rule: Union[Rule, Callable]):
    """Tell the folder what `layer_class` is: a `Rule` or `layer -> Rule`.

    Use it for your own layers, e.g. a clipping layer that keeps inputs
    >= 0: `register(MyClip, Rule(PASSTHROUGH))`. Lookups use the exact
    class. Affine rules are only honoured for the built-in affine layers.

    Example:

    >>> class Clip(keras.layers.Layer):
    ...     def call(self, x):
    ...         return keras.ops.clip(x, 0.0, 1.0)
    >>> register(Clip, Rule(PASSTHROUGH))
    >>> rule_for(Clip()).kind
    'passthrough'
    """
    if not isinstance(layer_class, type):
        raise TypeError(f"register() takes a class, got {type(layer_class).__name__}.")
    if isinstance(rule, Rule):
        _TABLE[layer_class] = lambda layer, _rule=rule: _rule
    elif callable(rule):
        _TABLE[layer_class] = rule
    else:
        raise TypeError(f"rule must be a Rule or a callable, got {type(rule).__name__}.")


def _register_builtins():
    layers = keras.layers
    for name in ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D",
                 "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D"):
        if hasattr(layers, name):
            register(getattr(layers, name), _affine_rule)
    register(layers.BatchNormalization, _batchnorm_rule)
    for name in ("ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "Activation"):
        register(getattr(layers, name), _activation)
    for name in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                 "GaussianNoise", "GaussianDropout", "AlphaDropout",
                 "ActivityRegularization", "Identity"):
        if hasattr(layers, name):
            register(getattr(layers, name), _identity)
    for name in (
        "Flatten", "Reshape", "Permute", "RepeatVector",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling3D",
        "Concatenate", "Add", "Multiply", "Maximum", "Minimum", "Average",
    ):
        if hasattr(layers, name):
            register(getattr(layers, name), _passthrough)
    register(layers.UpSampling2D, _upsampling)


_register_builtins()


def _training_forced(node):
    kwargs = getattr(node, "kwargs", None) or {}
    return kwargs.get("training") is True


def rule_for(layer, node=None) -> Rule:
    """The `Rule` for `layer` (a layer or raw operation of a model graph).

    `node` (a `graph.Node`), when given, lets a call made with
    `training=True` (MC dropout) count as opaque.

    Example:

    >>> rule_for(keras.layers.MaxPooling2D()).kind
    'passthrough'
    >>> rule_for(keras.layers.UpSampling2D(interpolation="bicubic")).kind
    'opaque'
    """
    make = _TABLE.get(type(layer))
    if make is None:
        if isinstance(layer, keras.Model):
            return Rule(OPAQUE, reason="nested model; fold it separately and rebuild")
        what = "raw operation" if not isinstance(layer, keras.layers.Layer) else "layer"
        return Rule(OPAQUE, reason=f"no rule for {what} type {type(layer).__name__}")
    rule = make(layer)
    if rule.kind in (IDENTITY, BATCHNORM) and node is not None and _training_forced(node):
        return Rule(OPAQUE, reason="called with training=True")
    return rule


def is_affine(layer):
    """True for the affine layer types the folder reads weights of."""
    return rule_for(layer).kind == AFFINE


def is_identity_at_inference(layer):
    """True for Dropout and the other identities at inference."""
    return rule_for(layer).kind == IDENTITY
