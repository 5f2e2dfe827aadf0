"""Merge math: compose two affine maps into one.

Theorem 1 of the paper: when the map between two affine layers is the
identity, `x -> (x K_a + b_a) K_b + b_b` is one affine layer with kernel
`K_a K_b` and bias `b_a K_b + b_b`. Arithmetic runs in float64 so that the
folded model's float32 weights are correctly rounded.
"""

import math

import numpy as np

__all__ = ["CannotMerge", "merge_affine", "affine_cost"]


class CannotMerge(Exception):
    """Raised with the reason why two affine ops cannot be merged exactly."""


def _layer_kind(op):
    return type(op.members[-1]).__name__


def merge_dense(first, second):
    """Kernel and bias of `second(first(x))` for two Dense ops."""
    kernel = first.kernel @ second.kernel
    bias = first.bias @ second.kernel + second.bias
    return kernel, bias


def merge_affine(first, second):
    """(kernel, bias) of the affine op equal to `second` after `first`."""
    kinds = (_layer_kind(first), _layer_kind(second))
    if kinds == ("Dense", "Dense"):
        return merge_dense(first, second)
    raise CannotMerge(f"no exact merge rule for {kinds[0]} -> {kinds[1]}")


def _has_bias(op):
    return any(getattr(layer, "use_bias", True) for layer in op.members) or bool(
        np.any(op.bias)
    )


def affine_cost(kernel_shape, output_shape, has_bias):
    """(parameters, FLOPs per example) of an affine op.

    FLOPs count 2 per multiply-accumulate, the usual convention.
    """
    fan_in = math.prod(kernel_shape[:-1])
    units = kernel_shape[-1]
    positions = math.prod(d for d in output_shape[1:-1] if d is not None)
    params = fan_in * units + (units if has_bias else 0)
    return params, 2 * fan_in * units * positions


def op_cost(op, kernel=None):
    kernel = op.kernel if kernel is None else kernel
    return affine_cost(kernel.shape, op.output_shape, _has_bias(op))
