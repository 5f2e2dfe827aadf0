"""Layers that folded models hold: `BiasMap`, a position-dependent bias.

Merging a per-position affine map `A(x) = K x + b` (a 1x1 convolution or a
Dense on channels, with its BatchNormalization) into a following zero-padded
convolution `W` is exact only with a bias that depends on the position:

    W(P(A(x))) = (W o K)(P(x)) + W(P(b))

`W(P(b))` does not depend on `x`; it equals the ordinary bias away from the
borders and differs on a ring of width about half the kernel. `BiasMap`
stores that constant compactly: every row (column, ...) inside the ring is
the same, so one of them stands for all (`repeat_at`), and a 3x3 'same' map
of C channels holds 9 C numbers whatever the image size. The layer sits on
the inference path after a merged convolution, where gathering the table
on every call made a folded net slower at batch 1 than the padded form it
replaces; so the full map is expanded once, whenever the table is set or
loaded, into a second non-trainable weight that `call` adds in one
broadcast. Only the table is saved and counted as parameters.
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
    'same' or zero-padded convolution. The table sits in a non-trainable
    weight, and so does the full map expanded from it (`set_weights`,
    `set_table` and loading keep the two in step), so that `call` is one
    addition; `.keras` files store the table only, and `model.export` and
    the LiteRT converter carry the full map as a constant.

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
        # derived from `table` (see `set_table`), never saved
        self.full_map = self.add_weight(
            name="full_map", shape=expected, initializer="zeros", trainable=False)

    def expand(self, table):
        """The full map `(*shape, channels)` of a numpy `table`.

        Example:

        >>> layer = BiasMap(shape=(1, 4), channels=1, repeat_at=(0, 1), table_shape=(1, 3))
        >>> layer.expand(np.array([[[1.0], [2.0], [3.0]]]))[..., 0].tolist()
        [[1.0, 2.0, 2.0, 3.0]]
        """
        full = np.asarray(table)
        for axis, (n, t, r) in enumerate(zip(self.map_shape, self.table_shape, self.repeat_at)):
            if n != t:  # the inside entry repeated, the ring as stored
                index = list(range(r)) + [r] * (n - t + 1) + list(range(r + 1, t))
                full = np.take(full, index, axis=axis)
        return full

    def set_table(self, table):
        """Set the compact table and the full map expanded from it."""
        table = np.asarray(table)
        self.table.assign(table)
        self.full_map.assign(self.expand(table).astype(self.full_map.dtype))

    def bias_map(self):
        """The full constant `(*shape, channels)` as a backend tensor."""
        return keras.ops.convert_to_tensor(self.full_map)

    def call(self, inputs):
        return inputs + keras.ops.cast(self.full_map, inputs.dtype)

    def set_weights(self, weights):
        """Accepts the table alone, or `get_weights()`; the full map is
        always expanded from the table, so the two cannot disagree."""
        if len(weights) not in (1, 2):
            raise ValueError(
                f"BiasMap '{self.name}' takes [table] (or [table, full_map]), got "
                f"{len(weights)} arrays.")
        if tuple(np.shape(weights[0])) != tuple(self.table.shape):
            raise ValueError(
                f"BiasMap '{self.name}': table of shape {tuple(np.shape(weights[0]))}, "
                f"expected {tuple(self.table.shape)}.")
        self.set_table(weights[0])

    def save_own_variables(self, store):
        store["0"] = self.table  # the compact form; the full map is derived

    def load_own_variables(self, store):
        if len(store.keys()) != 1:
            raise ValueError(
                f"BiasMap '{self.name}' stores one weight (its table), but the file "
                f"lists {len(store.keys())}.")
        self.set_table(np.asarray(store["0"]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(shape=self.map_shape, channels=self.channels, repeat_at=self.repeat_at,
                      table_shape=self.table_shape)
        return config


registry.register(BiasMap, registry.Rule(
    registry.BIAS_MAP, reason="carried over: a position-dependent bias a fold made"))
