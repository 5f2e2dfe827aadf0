"""Layers that folded models hold: `BiasMap`, a position-dependent bias.

Merging a per-position affine map `A(x) = K x + b` (a 1x1 convolution or a
Dense on channels, with its BatchNormalization) into a following zero-padded
convolution `W` is exact only with a bias that depends on the position:

    W(P(A(x))) = (W o K)(P(x)) + W(P(b))

`W(P(b))` does not depend on `x`; it equals the ordinary bias away from the
borders and differs on a ring of width about half the kernel. `BiasMap`
adds that constant, stored compactly: every row (column, ...) inside the
ring is the same, so one of them stands for all (`repeat_at`), and a 3x3
'same' map of C channels holds 9 C numbers whatever the image size.
"""

import keras
import numpy as np

from tf_layersparse import registry

__all__ = ["BiasMap"]


@keras.saving.register_keras_serializable(package="tf_layersparse")
class BiasMap(keras.layers.Layer):
    """Adds a constant tensor of its input's shape (channels last).

    The constant is `table` expanded along each spatial axis `a` by
    repeating its entry `repeat_at[a]` until the axis has `shape[a]`
    entries. `fold` makes these when it merges a biased 1x1 layer into a
    'same' or zero-padded convolution; the table sits in a non-trainable
    weight, so `.keras` files, `model.export` and the LiteRT converter
    carry it.

    Args:
        shape: spatial shape of the input (and output), e.g. `(H, W)`.
        channels: number of channels (last axis).
        repeat_at: per spatial axis, the index of the table entry that is
            repeated (the inside of the ring); the table has
            `shape[a] - (repeats - 1)` entries on axis `a`.
        table_shape: spatial shape of the stored table; defaults to `shape`
            (no repetition).

    Example:

    >>> import numpy as np
    >>> layer = BiasMap(shape=(4, 5), channels=1, repeat_at=(1, 1), table_shape=(3, 3))
    >>> layer.build((None, 4, 5, 1))
    >>> layer.set_weights([np.arange(9.0).reshape(3, 3, 1)])
    >>> y = layer(np.zeros((1, 4, 5, 1), "float32"))
    >>> keras.ops.convert_to_numpy(y)[0, ..., 0].astype(int).tolist()
    [[0, 1, 1, 1, 2], [3, 4, 4, 4, 5], [3, 4, 4, 4, 5], [6, 7, 7, 7, 8]]
    """

    def __init__(self, shape, channels, repeat_at, table_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.map_shape = tuple(int(n) for n in shape)
        self.channels = int(channels)
        self.repeat_at = tuple(int(i) for i in repeat_at)
        self.table_shape = tuple(int(n) for n in (table_shape or shape))
        if not (len(self.map_shape) == len(self.repeat_at) == len(self.table_shape)):
            raise ValueError(
                f"BiasMap '{self.name}': shape {self.map_shape}, repeat_at {self.repeat_at} and "
                f"table_shape {self.table_shape} must have one entry per spatial axis.")
        for n, t, r in zip(self.map_shape, self.table_shape, self.repeat_at):
            if not (1 <= t <= n and 0 <= r < t):
                raise ValueError(
                    f"BiasMap '{self.name}': table_shape {self.table_shape} and repeat_at "
                    f"{self.repeat_at} do not describe a map of shape {self.map_shape}.")
        if self.channels < 1:
            raise ValueError(f"BiasMap '{self.name}': channels must be >= 1, got {channels}.")

    def build(self, input_shape):
        expected = self.map_shape + (self.channels,)
        got = tuple(input_shape[1:])
        if got != expected:
            raise ValueError(
                f"BiasMap '{self.name}' adds a map of shape {expected} but its input "
                f"has shape {got}.")
        self.table = self.add_weight(
            name="table", shape=self.table_shape + (self.channels,),
            initializer="zeros", trainable=False)

    def bias_map(self):
        """The full constant `(*shape, channels)` as a backend tensor."""
        full = keras.ops.convert_to_tensor(self.table)
        for axis, (n, t, r) in enumerate(zip(self.map_shape, self.table_shape, self.repeat_at)):
            if n == t:
                continue
            # one gather per axis: the inside entry repeated, the ring as stored
            index = list(range(r)) + [r] * (n - t + 1) + list(range(r + 1, t))
            full = keras.ops.take(full, np.asarray(index, "int32"), axis=axis)
        return full

    def call(self, inputs):
        return inputs + keras.ops.cast(self.bias_map(), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(shape=self.map_shape, channels=self.channels, repeat_at=self.repeat_at,
                      table_shape=self.table_shape)
        return config


registry.register(BiasMap, registry.Rule(
    registry.BIAS_MAP, reason="carried over: a position-dependent bias a fold made"))
