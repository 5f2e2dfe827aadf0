"""Merge math: compose two affine maps into one.

Theorem 1 of the paper: when the map between two affine layers is the
identity, `x -> (x K_a + b_a) K_b + b_b` is one affine layer with kernel
`K_a K_b` and bias `b_a K_b + b_b`. Convolutions compose the same way, with
the kernels convolved. Arithmetic runs in float64 so that the folded
model's float32 weights are correctly rounded.
"""

import dataclasses
import itertools
import math

import numpy as np

__all__ = [
    "CannotMerge",
    "Merged",
    "merge_affine",
    "merge_through_flatten",
    "affine_cost",
    "geometry",
]

_CONV = ("Conv1D", "Conv2D", "Conv3D")


class CannotMerge(Exception):
    """Raised with the reason why two affine ops cannot be merged exactly."""


@dataclasses.dataclass
class Merged:
    """Result of a merge: weights, the layer whose config the result uses
    (with `overrides` applied), and whether the merge is exact."""

    kernel: np.ndarray
    bias: np.ndarray
    template: object
    overrides: dict
    exact: bool = True


def geometry(layer):
    """(padding, strides, dilation) of a convolution layer."""
    config = layer.get_config()
    return (
        config["padding"],
        tuple(config["strides"]),
        tuple(config["dilation_rate"]),
    )


def _kind(op):
    return type(op.template).__name__


def _check_conv(layer):
    config = layer.get_config()
    if config.get("groups", 1) != 1:
        raise CannotMerge(f"'{layer.name}' is a grouped convolution")
    if config.get("data_format") == "channels_first":
        raise CannotMerge(f"'{layer.name}' uses channels_first")


def _compose_kernels(k1, k2, s1, d1, d2):
    """Kernel of conv(k2, dilation d2) after conv(k1, stride s1, dilation d1)."""
    rank = k1.ndim - 2
    size = tuple(
        (k2.shape[a] - 1) * d2[a] * s1[a] + (k1.shape[a] - 1) * d1[a] + 1
        for a in range(rank)
    )
    out = np.zeros(size + (k1.shape[-2], k2.shape[-1]))
    for i in itertools.product(*(range(n) for n in k1.shape[:rank])):
        for j in itertools.product(*(range(n) for n in k2.shape[:rank])):
            t = tuple(j[a] * d2[a] * s1[a] + i[a] * d1[a] for a in range(rank))
            out[t] += k1[i] @ k2[j]
    return out


def _is_pointwise(kernel, strides):
    rank = kernel.ndim - 2
    return all(n == 1 for n in kernel.shape[:rank]) and all(s == 1 for s in strides)


def merge_conv(first, second, approximate=False):
    """Merge two convolutions of the same rank (see the README's table)."""
    _check_conv(first.template)
    _check_conv(second.template)
    (p1, s1, d1), (p2, s2, d2) = first.geometry, second.geometry
    k1, k2 = first.kernel, second.kernel
    rank = k1.ndim - 2
    bias = second.bias + first.bias @ k2.reshape(-1, *k2.shape[-2:]).sum(axis=0)
    if _is_pointwise(k2, s2):  # k x k -> 1 x 1: exact for any padding
        kernel = np.tensordot(k1, k2.reshape(k2.shape[-2:]), axes=([-1], [0]))
        return Merged(kernel, bias, first.template, _conv_overrides(kernel, p1, s1, d1))
    if _is_pointwise(k1, s1) and (p2 == "valid" or not np.any(first.bias)):
        # 1 x 1 -> k x k: exact unless a bias meets the second layer's padding
        kernel = np.tensordot(k1.reshape(k1.shape[-2:]), k2, axes=([1], [rank]))
        kernel = np.moveaxis(kernel, 0, rank)
        return Merged(kernel, bias, second.template, _conv_overrides(kernel, p2, s2, d2))
    kernel = _compose_kernels(k1, k2, s1, d1, d2)
    strides = tuple(a * b for a, b in zip(s1, s2))
    ones = (1,) * rank
    if p1 == p2 == "valid":
        return Merged(kernel, bias, second.template,
                      _conv_overrides(kernel, "valid", strides, ones))
    same_ok = (
        p1 == p2 == "same"
        and s1 == s2 == ones
        and d1 == d2 == ones
        and all(n % 2 == 1 for n in k1.shape[:rank] + k2.shape[:rank])
    )
    if not same_ok:
        raise CannotMerge(
            f"padding '{p1}' -> '{p2}' with strides {s1}, {s2}: no exact merge "
            "(the intermediate zero padding is not a function of the padded input)"
        )
    if not approximate:
        raise CannotMerge(
            "'same' -> 'same' differs at the borders; pass approximate=True to "
            "merge anyway and measure the border error"
        )
    return Merged(kernel, bias, second.template,
                  _conv_overrides(kernel, "same", ones, ones), exact=False)


def _conv_overrides(kernel, padding, strides, dilation):
    return {
        "kernel_size": tuple(int(n) for n in kernel.shape[:-2]),
        "filters": int(kernel.shape[-1]),
        "padding": padding,
        "strides": tuple(strides),
        "dilation_rate": tuple(dilation),
    }


def merge_affine(first, second, approximate=False):
    """`Merged` op equal to `second` after `first`, or raise `CannotMerge`."""
    kinds = (_kind(first), _kind(second))
    if kinds == ("Dense", "Dense"):
        return Merged(first.kernel @ second.kernel,
                      first.bias @ second.kernel + second.bias,
                      second.template, {})
    if kinds[0] in _CONV and kinds[1] == kinds[0]:
        return merge_conv(first, second, approximate)
    if kinds[0] in _CONV and kinds[1] == "Dense":
        # Dense on a feature map acts on channels: a 1 x 1 convolution
        _check_conv(first.template)
        kernel = np.tensordot(first.kernel, second.kernel, axes=([-1], [0]))
        return Merged(kernel, first.bias @ second.kernel + second.bias,
                      first.template, _conv_overrides(kernel, *first.geometry))
    raise CannotMerge(f"no exact merge rule for {kinds[0]} -> {kinds[1]}")


def _float64_conv(op):
    """A float64 copy of the convolution `op` stands for, weights included."""
    config = op.template.get_config()
    config.update(op.overrides)
    config.update(
        name=f"{op.name}_float64", dtype="float64", activation="linear",
        use_bias=True, kernel_regularizer=None, bias_regularizer=None,
        activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
    )
    layer = type(op.template).from_config(config)
    layer.build((None,) + tuple(op.input_shape[1:]))
    layer.kernel.assign(op.kernel)
    layer.bias.assign(op.bias)
    return layer


def merge_through_flatten(conv, flatten, dense, chunk=64):
    """Merge `dense(flatten(conv(x)))` into one Dense on `flatten(x)`.

    The convolution is linear in its (zero-padded) input whatever its
    padding, strides, dilation or groups, so the merge is exact. Row `u` of
    the merged kernel is the convolution's transpose applied to the Dense
    kernel's column `u`, which reverse-mode differentiation computes, in
    float64, `chunk` columns at a time; applying the same Flatten to it puts
    the rows in the order the rebuilt Flatten produces.
    """
    import tensorflow as tf  # only this merge needs a differentiable backend

    if None in tuple(conv.input_shape[1:]):
        raise CannotMerge(f"'{conv.name}' has an input of unknown spatial size")
    config = flatten.get_config()
    config.update(name=f"{flatten.name}_float64", dtype="float64")
    flat = type(flatten).from_config(config)
    layer = _float64_conv(conv)
    in_shape = tuple(conv.input_shape[1:])
    columns = []
    for start in range(0, dense.kernel.shape[1], chunk):
        cotangent = tf.constant(dense.kernel[:, start:start + chunk].T)
        x = tf.zeros((cotangent.shape[0],) + in_shape, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = flat(layer(x))
        grad = tape.gradient(y, x, output_gradients=cotangent)
        columns.append(np.asarray(flat(grad)))
    kernel = np.concatenate(columns, axis=0).T
    conv_bias = np.asarray(flat(layer(tf.zeros((1,) + in_shape, tf.float64))))[0]
    bias = conv_bias @ dense.kernel + dense.bias
    return Merged(kernel, bias, dense.template, {})


def has_bias(op):
    return any(getattr(layer, "use_bias", True) for layer in op.members) or bool(
        np.any(op.bias)
    )


def affine_cost(kernel_shape, output_shape, with_bias):
    """(parameters, FLOPs per example) of an affine op.

    FLOPs count 2 per multiply-accumulate, the usual convention.
    """
    fan_in = math.prod(kernel_shape[:-1])
    units = kernel_shape[-1]
    positions = math.prod(d for d in output_shape[1:-1] if d is not None)
    params = fan_in * units + (units if with_bias else 0)
    return params, 2 * fan_in * units * positions


def op_cost(op, kernel=None):
    kernel = op.kernel if kernel is None else kernel
    return affine_cost(kernel.shape, op.output_shape, has_bias(op))
