"""Merge math: pure functions from affine maps to affine maps, in float64.

Theorem 1 of the paper: when the map between two affine layers is the
identity, `x -> (x K_a + b_a) K_b + b_b` is one affine layer with kernel
`K_a K_b` and bias `b_a K_b + b_b`. Convolutions compose the same way, with
the kernels convolved. Each rule below is one short function (weights in,
weights out, after RepVGG's `_fuse_bn_tensor` style); `CannotMerge` carries
the reason when no exact rule applies. Arithmetic runs in float64 so that
the folded model's float32 weights are correctly rounded.

Zero padding between a per-position affine map `A(x) = K x + b` (1x1
convolution, Dense on channels) and a convolution `W` commutes with `K`
but not with `b`: `W(P(A(x))) = (W o K)(P(x)) + W(P(b))`. The constant
`W(P(b))` is the merged layer's *bias map* (`Affine.bias_map`), equal to the
ordinary bias inside and different on the border ring; it is computed here
on the known spatial size and carried through the maps that follow (a 1x1
projection maps it linearly, a 'valid' convolution convolves it).
"""

import dataclasses
import itertools
from typing import Optional

import numpy as np

from tf_layersparse.cost import affine_cost

__all__ = [
    "Affine",
    "CannotMerge",
    "add_identity",
    "bias_map_table",
    "compose",
    "compose_through_flatten",
    "fold_batchnorm",
    "same_pads",
]


class CannotMerge(Exception):
    """Raised with the reason why two affine maps cannot be merged exactly."""


@dataclasses.dataclass(frozen=True)
class Affine:
    """An affine layer's map: `form` is "dense", "conv" (with `groups`),
    "depthwise" or "separable" (depthwise `kernel` then `pointwise`
    `(channels * multiplier, units)`); `geometry` is (padding, strides,
    dilation) of a convolution; `exact` is False after a 'same'-padding
    merge that differs at the borders. `scale` is a per-output-channel
    factor (a folded BatchNormalization) not yet multiplied into `kernel`:
    big kernels are only copied to float64 when they are merged or
    rebuilt (`materialized`), which keeps folding a ResNet fast.
    `bias_map`, when not None, is the bias at every output position
    `(spatial..., units)` (a merge through zero padding); `bias` then holds
    its value inside the border ring.

    Example:

    >>> a = Affine("dense", np.eye(2), np.ones(2))
    >>> compose(a, a).bias.tolist()
    [2.0, 2.0]
    """

    form: str
    kernel: np.ndarray
    bias: np.ndarray
    pointwise: Optional[np.ndarray] = None
    geometry: Optional[tuple] = None
    groups: int = 1
    channels_first: bool = False
    exact: bool = True
    scale: Optional[np.ndarray] = None
    bias_map: Optional[np.ndarray] = None

    def materialized(self):
        """This map with `scale` applied and every array in float64."""
        if self.scale is None and self.kernel.dtype == np.float64 and (
                self.pointwise is None or self.pointwise.dtype == np.float64):
            return self
        kernel = self.kernel.astype(np.float64)
        if self.scale is not None:
            kernel *= self.scale.reshape(kernel.shape[-2:]) if self.form == "depthwise" else (
                self.scale)
        pointwise = None if self.pointwise is None else self.pointwise.astype(np.float64)
        return dataclasses.replace(self, kernel=kernel, pointwise=pointwise, scale=None)

    def _column_extremes(self):
        """Per output channel (min, max) of the effective kernel, or None
        when the form needs the full kernel."""
        if self.form == "separable":
            return None
        k = self.kernel
        axes = tuple(range(k.ndim - (2 if self.form == "depthwise" else 1)))
        low, high = k.min(axis=axes), k.max(axis=axes)
        if self.scale is None:
            return low, high
        scale = self.scale.reshape(low.shape)
        return (np.where(scale >= 0, low * scale, high * scale),
                np.where(scale >= 0, high * scale, low * scale))

    @property
    def rank(self):
        return self.kernel.ndim - 2

    @property
    def spatial(self):
        return tuple(self.kernel.shape[: self.rank])

    def full_kernel(self):
        """The kernel as one dense convolution `(k..., c_in, c_out)`."""
        if self.scale is not None or self.kernel.dtype != np.float64:
            return self.materialized().full_kernel()
        k = self.kernel
        if self.form in ("dense",) or (self.form == "conv" and self.groups == 1):
            return k
        if self.form == "conv":
            c_in_g, c_out = k.shape[-2], k.shape[-1]
            out_g = c_out // self.groups
            full = np.zeros(k.shape[:-2] + (c_in_g * self.groups, c_out))
            for g in range(self.groups):
                full[..., g * c_in_g:(g + 1) * c_in_g, g * out_g:(g + 1) * out_g] = (
                    k[..., g * out_g:(g + 1) * out_g])
            return full
        channels, mult = k.shape[-2], k.shape[-1]
        if self.form == "depthwise":
            full = np.zeros(k.shape[:-2] + (channels, channels * mult))
            for c in range(channels):
                full[..., c, c * mult:(c + 1) * mult] = k[..., c, :]
            return full
        pointwise = self.pointwise.reshape(channels, mult, -1)
        return np.einsum("...cm,cmo->...co", k, pointwise)

    def nonnegative(self):
        """True if the effective kernel and bias have no negative entry."""
        extremes = self._column_extremes()
        low = extremes[0] if extremes is not None else self.full_kernel()
        bias = self.bias if self.bias_map is None else self.bias_map
        return bool(low.min(initial=0.0) >= 0 and bias.min(initial=0.0) >= 0)

    def negative_norm(self):
        """Norm of the negative part of the effective kernel and bias."""
        b = np.minimum(self.bias, 0)
        if self.form == "separable" and self.kernel.shape[-1] == 1 and self.scale is None:
            # multiplier 1: entry (tap, c, o) is dw[tap, c] * pw[c, o], negative
            # where the signs differ; sums per channel spare the dense kernel
            # (a tenth of a second per NASNet layer)
            dw = self.kernel.reshape(-1, self.kernel.shape[-2]).astype(np.float64)
            pw = self.pointwise.astype(np.float64)
            squares = lambda a: (a * a).sum(axis=-1)  # noqa: E731
            dw_pos, dw_neg = squares(np.maximum(dw, 0).T), squares(np.minimum(dw, 0).T)
            pw_pos, pw_neg = squares(np.maximum(pw, 0)), squares(np.minimum(pw, 0))
            total = np.dot(dw_pos, pw_neg) + np.dot(dw_neg, pw_pos)
            return float(np.sqrt(total + np.dot(b, b)))
        if self.form == "separable":
            k = np.minimum(self.full_kernel(), 0).ravel()
            return float(np.sqrt(np.dot(k, k) + np.dot(b, b)))
        k = self.kernel.reshape(-1, *self.kernel.shape[-(2 if self.form == "depthwise" else 1):])
        negative = np.minimum(k, 0)
        squares = np.einsum("i...,i...->...", negative, negative, dtype=np.float64)
        if self.scale is not None:
            positive = np.maximum(k, 0)
            flipped = np.einsum("i...,i...->...", positive, positive, dtype=np.float64)
            scale = self.scale.reshape(squares.shape)
            squares = np.where(scale >= 0, squares, flipped) * scale ** 2
        return float(np.sqrt(squares.sum() + np.dot(b, b)))

    def cost(self, output_shape, with_bias=True):
        """(parameters, FLOPs per example) of the layer this map becomes."""
        pointwise = None if self.pointwise is None else self.pointwise.shape
        if self.bias_map is None:
            return affine_cost(self.form, self.kernel.shape, output_shape, with_bias,
                               groups=self.groups, pointwise_shape=pointwise)
        # the layer drops its bias; the map adds its stored table and one
        # addition per output element
        params, flops = affine_cost(self.form, self.kernel.shape, output_shape, False,
                                    groups=self.groups, pointwise_shape=pointwise)
        return params + bias_map_table(self.bias_map)[0].size, flops + self.bias_map.size


def fold_batchnorm(affine, scale, shift):
    """The map `affine` followed by a per-channel `x * scale + shift`.

    Example:

    >>> a = fold_batchnorm(Affine("dense", np.ones((1, 2)), np.zeros(2)),
    ...                    np.array([2.0, -1.0]), np.array([0.5, 0.0]))
    >>> a.materialized().kernel.tolist(), a.bias.tolist()
    ([[2.0, -1.0]], [0.5, 0.0])
    """
    bias = affine.bias * scale + shift
    if affine.bias_map is not None:
        affine = dataclasses.replace(affine, bias_map=affine.bias_map * scale + shift)
    if affine.form == "separable":
        pointwise = affine.pointwise.astype(np.float64) * scale
        return dataclasses.replace(affine, pointwise=pointwise, bias=bias)
    total = scale if affine.scale is None else affine.scale * scale
    return dataclasses.replace(affine, scale=total, bias=bias)


def _is_pointwise(affine):
    padding, strides, _ = affine.geometry
    return all(n == 1 for n in affine.spatial) and all(s == 1 for s in strides)


def _then_matrix(first, matrix, bias):
    """`first` followed by a per-position linear map `matrix` (+ `bias`)."""
    new_bias = first.bias @ matrix + bias
    new_map = None if first.bias_map is None else first.bias_map @ matrix + bias
    if first.form == "depthwise":
        return Affine("separable", first.kernel, new_bias, matrix, first.geometry,
                      exact=first.exact, bias_map=new_map)
    if first.form == "separable":
        return dataclasses.replace(first, pointwise=first.pointwise @ matrix, bias=new_bias,
                                   bias_map=new_map)
    kernel = np.tensordot(first.full_kernel(), matrix, axes=([-1], [0]))
    return Affine("conv", kernel, new_bias, None, first.geometry, exact=first.exact,
                  bias_map=new_map)


def _compose_kernels(k1, k2, s1, d1, d2):
    """Kernel of conv(k2, dilation d2) after conv(k1, stride s1, dilation d1)."""
    rank = k1.ndim - 2
    size = tuple(
        (k2.shape[a] - 1) * d2[a] * s1[a] + (k1.shape[a] - 1) * d1[a] + 1
        for a in range(rank)
    )
    out = np.zeros(size + (k1.shape[-2], k2.shape[-1]))
    # tap j of k2 meets every tap of k1 at once, on a strided window of `out`
    span = tuple(slice(0, (k1.shape[a] - 1) * d1[a] + 1, d1[a]) for a in range(rank))
    for j in itertools.product(*(range(n) for n in k2.shape[:rank])):
        where = tuple(slice(j[a] * d2[a] * s1[a] + span[a].start,
                            j[a] * d2[a] * s1[a] + span[a].stop, d1[a]) for a in range(rank))
        out[where] += k1 @ k2[j]
    return out


def same_pads(size, kernel, stride, dilation):
    """(before, after) zero padding of Keras' 'same' on one axis.

    Example:

    >>> same_pads(48, 3, 2, 1), same_pads(7, 3, 1, 1)
    ((0, 1), (1, 1))
    """
    extent = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _own_pads(affine, in_spatial):
    padding, strides, dilation = affine.geometry
    if padding == "valid":
        return tuple((0, 0) for _ in range(affine.rank))
    return tuple(same_pads(in_spatial[a], affine.spatial[a], strides[a], dilation[a])
                 for a in range(affine.rank))


def _total_pads(second, in_shape, pad):
    """Zero padding `second` applies to its input of spatial size `in_shape`,
    after an explicit `pad` (a ZeroPadding layer) if any; raises when the
    size is unknown and needed."""
    pad = pad or tuple((0, 0) for _ in range(second.rank))
    padding = second.geometry[0]
    extents = [(k - 1) * d + 1 for k, d in zip(second.spatial, second.geometry[2])]
    if padding == "valid" or all(e == 1 for e in extents):
        # 'same' pads a 1x1 window by nothing, whatever the size and stride
        own = tuple((0, 0) for _ in range(second.rank))
    elif in_shape is None or any(n is None for n in in_shape):
        raise CannotMerge(
            "the bias meets 'same' zero padding, and the bias map that makes this merge "
            "exact needs a known spatial size (the input has an unknown one)")
    else:
        own = _own_pads(second, [n + lo + hi for n, (lo, hi) in zip(in_shape, pad)])
    return tuple((a + c, b + d) for (a, b), (c, d) in zip(pad, own))


def _apply_linear(affine, field, pads):
    """The linear part of convolution `affine` on one channels-last array
    `field` `(spatial..., channels)`, zero-padded by `pads` first."""
    _, strides, dilation = affine.geometry
    rank = affine.rank
    x = np.pad(field, list(pads) + [(0, 0)])
    extent = [(affine.spatial[a] - 1) * dilation[a] + 1 for a in range(rank)]
    out_shape = [(x.shape[a] - extent[a]) // strides[a] + 1 for a in range(rank)]
    depthwise = affine.form == "depthwise"
    kernel = affine.kernel if depthwise else affine.full_kernel()
    out = 0.0
    for tap in itertools.product(*(range(n) for n in affine.spatial)):
        where = tuple(
            slice(tap[a] * dilation[a], tap[a] * dilation[a] + (out_shape[a] - 1) * strides[a] + 1,
                  strides[a])
            for a in range(rank))
        patch = x[where]
        if depthwise:  # (..., c) x (c, multiplier) -> (..., c * multiplier)
            out = out + (patch[..., None] * kernel[tap]).reshape(patch.shape[:-1] + (-1,))
        else:
            out = out + patch @ kernel[tap]
    return np.asarray(out, dtype=np.float64)


def _bias_map_through(first, second, in_shape, pads):
    """`second` on the zero-padded constant output of `first`: the merged
    layer's bias at every position (`in_shape` is first's output size)."""
    if in_shape is None or any(n is None for n in in_shape):
        raise CannotMerge(
            "the bias meets zero padding, and the bias map that makes this merge exact "
            "needs a known spatial size (the input has an unknown one)")
    channels = first.bias.shape[-1]
    field = first.bias_map if first.bias_map is not None else np.broadcast_to(
        first.bias, tuple(in_shape) + (channels,))
    return _apply_linear(second, field, pads) + second.bias


def _as_pointwise(dense, rank):
    """A Dense acting on channels, as the 1x1 convolution it is."""
    ones = (1,) * rank
    return Affine("conv", dense.kernel.reshape(ones + dense.kernel.shape), dense.bias,
                  geometry=("valid", ones, ones), exact=dense.exact)


def _compose_convs(first, second, approximate, in_shape=None, pad=None):
    (p1, s1, d1), (p2, s2, d2) = first.geometry, second.geometry
    k2 = second.full_kernel()
    bias = second.bias + first.bias @ k2.reshape(-1, *k2.shape[-2:]).sum(axis=0)
    exact = first.exact and second.exact
    if _is_pointwise(first):
        # 1 x 1 -> k x k: the 1 x 1 acts per position and commutes with zero
        # padding; its bias does not (the padding shows 0 where the merged
        # layer would see the bias), which the bias map makes up for
        matrix = first.full_kernel().reshape(first.kernel.shape[-2], -1)
        kernel = np.moveaxis(np.tensordot(matrix, k2, axes=([1], [second.rank])), 0, second.rank)
        bias_map = None
        if np.any(first.bias) or first.bias_map is not None:
            pads = _total_pads(second, in_shape, pad)
            if first.bias_map is not None or any(lo or hi for lo, hi in pads):
                bias_map = _bias_map_through(first, second, in_shape, pads)
        return Affine("conv", kernel, bias, None, second.geometry, exact=exact,
                      bias_map=bias_map)
    if pad is not None:
        raise CannotMerge(
            "zero padding between a convolution larger than 1x1 (or strided) and the "
            "next one: the padded values are not a function of the padded input")
    kernel = _compose_kernels(first.full_kernel(), k2, s1, d1, d2)
    ones = (1,) * first.rank
    bias_map = None
    if first.bias_map is not None:  # convolved like any input ('valid' here)
        own = _own_pads(second, first.bias_map.shape[:-1])
        bias_map = _apply_linear(second, first.bias_map, own) + second.bias
    if p1 == p2 == "valid":
        strides = tuple(a * b for a, b in zip(s1, s2))
        return Affine("conv", kernel, bias, None, ("valid", strides, ones), exact=exact,
                      bias_map=bias_map)
    same_ok = (
        p1 == p2 == "same" and s1 == s2 == ones and d1 == d2 == ones
        and all(n % 2 == 1 for n in first.spatial + second.spatial)
    )
    if not same_ok:
        raise CannotMerge(
            f"padding '{p1}' -> '{p2}' with strides {s1}, {s2}: no exact merge "
            "(the intermediate zero padding is not a function of the padded input)")
    if not approximate:
        raise CannotMerge(
            "'same' -> 'same' differs at the borders; pass approximate=True to "
            "merge anyway and measure the border error")
    return Affine("conv", kernel, bias, None, ("same", ones, ones), exact=False,
                  bias_map=bias_map)


def compose(first, second, approximate=False, in_shape=None, pad=None):
    """The affine map `second` after `first`, or raise `CannotMerge`.

    Dense after a convolution acts on channels, like a 1x1 convolution (and
    a Dense on channels before one, too); a depthwise convolution followed
    by a per-position map becomes a separable one; otherwise convolutions
    compose into one dense convolution (exact for 'valid' chains and
    whenever one side is 1x1 with stride 1; 'same' -> 'same' only with
    `approximate`). A 1x1 layer with a bias before a 'same' convolution, or
    before zero padding `pad` (`((before, after), ...)` per spatial axis, a
    `ZeroPadding` layer between the two) merges with a bias map, which
    needs `in_shape`, the spatial size of `first`'s output.

    Example:

    >>> dw = Affine("depthwise", np.ones((3, 3, 2, 1)), np.zeros(2),
    ...             geometry=("same", (1, 1), (1, 1)))
    >>> pw = Affine("conv", np.ones((1, 1, 2, 4)), np.zeros(4),
    ...             geometry=("valid", (1, 1), (1, 1)))
    >>> compose(dw, pw).form
    'separable'
    >>> expand = Affine("conv", np.ones((1, 1, 1, 1)), np.ones(1),
    ...                 geometry=("valid", (1, 1), (1, 1)))
    >>> box = Affine("conv", np.ones((3, 3, 1, 1)), np.zeros(1),
    ...              geometry=("same", (1, 1), (1, 1)))
    >>> compose(expand, box, in_shape=(3, 3)).bias_map[..., 0].tolist()
    [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    """
    first, second = first.materialized(), second.materialized()
    if first.channels_first or second.channels_first:
        if first.form == second.form == "dense":
            pass
        else:
            raise CannotMerge("channels_first convolutions are not merged")
    if first.form == "dense" and second.form == "dense":
        return Affine("dense", first.kernel @ second.kernel,
                      first.bias @ second.kernel + second.bias)
    if first.form == "dense" and second.form != "dense":
        first = _as_pointwise(first, second.rank)
    if second.form != "dense" and first.rank != second.rank:
        raise CannotMerge(f"no exact merge rule for {first.form} -> {second.form}")
    if second.form == "dense":
        return _then_matrix(first, second.kernel, second.bias)
    if _is_pointwise(second) and pad is None:
        matrix = second.full_kernel().reshape(second.full_kernel().shape[-2:])
        return _then_matrix(first, matrix, second.bias)
    return _compose_convs(first, second, approximate, in_shape, pad)


def bias_map_table(bias_map):
    """`(table, repeat_at)`: `bias_map` with, along each spatial axis, the
    longest run of equal entries (the inside of the border ring) stored
    once, at index `repeat_at[axis]`; `BiasMap` expands it back. Only
    entries that are exactly equal are merged, so the expansion is exact.

    Example:

    >>> m = np.array([[1.0, 2.0, 2.0, 2.0, 3.0]]).reshape(1, 5, 1)
    >>> table, at = bias_map_table(m)
    >>> table[..., 0].tolist(), at
    ([[1.0, 2.0, 3.0]], (0, 1))
    """
    table, repeat_at = bias_map, []
    for axis in range(bias_map.ndim - 1):
        moved = np.moveaxis(table, axis, 0)
        equal = [np.array_equal(moved[i], moved[i + 1]) for i in range(len(moved) - 1)]
        best, start = (0, 0), 0  # (length, start) of the longest run of equal entries
        for i in range(len(moved)):
            if i == 0 or not equal[i - 1]:
                start = i
            best = max(best, (i - start + 1, -start))
        length, first = best[0], -best[1]
        kept = np.concatenate([moved[:first + 1], moved[first + length:]], axis=0)
        table = np.moveaxis(kept, 0, axis)
        repeat_at.append(first)
    return table, tuple(repeat_at)


def _tf_padding(size, out, kernel, stride, dilation, padding):
    if padding == "valid":
        return 0
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


def _conv_transpose(affine, grads, in_shape, out_shape):
    """Adjoint of the convolution's linear part on `grads` `(n, *out_shape)`."""
    padding, strides, dilation = affine.geometry
    kernel = affine.full_kernel()
    rank = affine.rank
    pads = [_tf_padding(in_shape[a], out_shape[a], kernel.shape[a], strides[a],
                        dilation[a], padding) for a in range(rank)]
    size = [max(in_shape[a] + pads[a], (out_shape[a] - 1) * strides[a]
                + (kernel.shape[a] - 1) * dilation[a] + 1) for a in range(rank)]
    buffer = np.zeros((grads.shape[0], *size, kernel.shape[-2]))
    for tap in itertools.product(*(range(n) for n in kernel.shape[:rank])):
        where = tuple(
            slice(tap[a] * dilation[a], tap[a] * dilation[a] + (out_shape[a] - 1) * strides[a] + 1,
                  strides[a])
            for a in range(rank))
        buffer[(slice(None),) + where] += grads @ kernel[tap].T
    crop = tuple(slice(pads[a], pads[a] + in_shape[a]) for a in range(rank))
    return buffer[(slice(None),) + crop]


def compose_through_flatten(conv, dense, in_shape, out_shape, channels_first=False):
    """`dense(flatten(conv(x)))` as one Dense on `flatten(x)` (channels last).

    The convolution is linear in its zero-padded input whatever its padding,
    strides or dilation, so this is exact. Row `u` of the merged kernel is
    the convolution's adjoint applied to the Dense kernel's column `u`,
    computed with numpy (any backend). `in_shape`/`out_shape` exclude the
    batch axis; `channels_first` is the Flatten's `data_format` (Keras then
    moves axis 1 last before flattening), applied to the merged rows too.

    Example:

    >>> conv = Affine("conv", np.ones((1, 1, 1, 2)), np.array([1.0, 0.0]),
    ...               geometry=("valid", (1, 1), (1, 1)))
    >>> dense = Affine("dense", np.ones((8, 1)), np.zeros(1))
    >>> merged = compose_through_flatten(conv, dense, (2, 2, 1), (2, 2, 2))
    >>> merged.kernel.ravel().tolist(), merged.bias.tolist()
    ([2.0, 2.0, 2.0, 2.0], [4.0])
    """
    conv, dense = conv.materialized(), dense.materialized()
    if None in tuple(in_shape) or None in tuple(out_shape):
        raise CannotMerge("input of unknown spatial size")
    in_shape, out_shape, units = tuple(in_shape), tuple(out_shape), dense.kernel.shape[1]
    if channels_first:  # Keras' Flatten moves axis 1 last before flattening
        grads = dense.kernel.T.reshape((units,) + out_shape[1:] + out_shape[:1])
        grads = np.moveaxis(grads, -1, 1)
    else:
        grads = dense.kernel.T.reshape((units,) + out_shape)
    # grads now has the conv output's layout; the adjoint works channels last
    if conv.channels_first:
        grads = np.moveaxis(grads, 1, -1)
        in_spatial, out_spatial = in_shape[1:], out_shape[1:]
    else:
        in_spatial, out_spatial = in_shape[:-1], out_shape[:-1]
    rows = _conv_transpose(conv, grads, in_spatial, out_spatial)
    bias = (conv.bias_map if conv.bias_map is not None
            else np.broadcast_to(conv.bias, out_spatial + conv.bias.shape))
    if conv.channels_first:  # back to the tensors' own layout
        rows, bias = np.moveaxis(rows, -1, 1), np.moveaxis(bias, -1, 0)
    if channels_first:
        rows, bias = np.moveaxis(rows, 1, -1), np.moveaxis(bias, 0, -1)
    kernel = rows.reshape(units, -1).T
    return Affine("dense", kernel, bias.reshape(-1) @ dense.kernel + dense.bias,
                  exact=conv.exact)


def add_identity(affine):
    """`x -> affine(x) + x` as one map (RepVGG): the identity joins the kernel.

    Needs as many outputs as inputs and, for convolutions, stride 1 with
    'same' padding and odd kernel sizes (or a 1x1 kernel), so that the
    centre tap reads the same position.

    Example:

    >>> add_identity(Affine("dense", np.zeros((2, 2)), np.zeros(2))).kernel.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    affine = affine.materialized()
    if affine.form == "dense":
        if affine.kernel.shape[0] != affine.kernel.shape[1]:
            raise CannotMerge("the residual changes the number of features")
        return dataclasses.replace(affine, kernel=affine.kernel + np.eye(affine.kernel.shape[0]))
    padding, strides, _ = affine.geometry
    if affine.channels_first:
        raise CannotMerge("channels_first convolutions are not merged")
    if any(s != 1 for s in strides) or any(n % 2 == 0 for n in affine.spatial) or (
            padding != "same" and any(n > 1 for n in affine.spatial)):
        raise CannotMerge("the residual needs stride 1, odd kernels and 'same' padding")
    centre = tuple(n // 2 for n in affine.spatial)
    if affine.form == "depthwise" and affine.kernel.shape[-1] == 1:
        kernel = affine.kernel.copy()
        kernel[centre] += 1.0
        return dataclasses.replace(affine, kernel=kernel)
    kernel = affine.full_kernel().copy()
    if kernel.shape[-2] != kernel.shape[-1]:
        raise CannotMerge("the residual changes the number of channels")
    kernel[centre] += np.eye(kernel.shape[-1])
    return Affine("conv", kernel, affine.bias, None, affine.geometry, exact=affine.exact,
                  bias_map=affine.bias_map)
