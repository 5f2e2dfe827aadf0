"""Random Sequential and Functional architectures: fold must merge exactly
the layers the construction made inactive and mergeable, and nothing else.

The builder tracks, while it adds layers, what folding should do: which
tensors are provably >= 0, and which inactive layer's output reaches the
next affine layer through removable operations only (its ReLU, Dropout,
Flatten before a Dense). The test then compares that bookkeeping with the
fold report, layer by layer.
"""

import dataclasses

import keras
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_layersparse as ls

CONV = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}
POOL = {1: keras.layers.MaxPooling1D, 2: keras.layers.MaxPooling2D}


@st.composite
def architectures(draw):
    functional = draw(st.booleans())
    kinds = ["conv", "conv", "pool"] + (["residual"] if functional else [])
    conv_blocks = draw(st.lists(st.sampled_from(kinds), max_size=5))
    block = lambda: dict(  # noqa: E731
        inactive=draw(st.booleans()),
        bn=draw(st.booleans()),
        inline=draw(st.booleans()),  # activation="relu" vs a ReLU layer
        dropout=draw(st.booleans()),
        kernel=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        width=draw(st.integers(1, 4)),
    )
    return dict(
        functional=functional,
        rank=draw(st.sampled_from([1, 2])),
        conv=[(kind, block()) for kind in conv_blocks],
        flatten=draw(st.sampled_from(["flatten", "global_pool"])),
        dense=[block() for _ in range(draw(st.integers(0, 3)))],
        seed=draw(st.integers(0, 2**16)),
    )


@dataclasses.dataclass
class Expected:
    """What fold should report for every affine layer we built."""

    action: dict = dataclasses.field(default_factory=dict)
    merges: int = 0
    affine: int = 0
    residuals: int = 0  # Add([conv(x), x]) fused into the conv (RepVGG)


class Builder:
    """Adds layers to a Sequential list or a Functional graph and predicts
    the fold as it goes."""

    def __init__(self, spec):
        self.rng = np.random.default_rng(spec["seed"])
        keras.utils.set_random_seed(spec["seed"])
        self.rank = spec["rank"]
        self.functional = spec["functional"]
        self.input = keras.Input((12,) * self.rank + (2,))
        self.tensor = self.input
        self.layers = []  # Sequential layers
        self.size, self.channels = 12, 2
        self.nonneg = False  # model inputs may be negative
        self.pending = None  # (name, kind) of an inactive layer awaiting a merge
        self.through_flatten = False
        self.weights = []  # (layer, bn, inactive) to set once built
        self.expected = Expected()

    def apply(self, layer):
        if self.functional:
            self.tensor = layer(self.tensor)
        else:
            self.layers.append(layer)
            self.tensor = layer(self.tensor)  # builds the layer; Sequential reuses it

    def affine(self, layer, kind, spec, activation=True):
        name = layer.name
        self.expected.affine += 1
        mergeable = self.pending is not None and (
            (self.pending[1] == kind == "conv" and not self.through_flatten)
            or (self.pending[1] == kind == "dense" and not self.through_flatten)
            or (self.pending[1] == "conv" and kind == "dense" and self.through_flatten)
        )
        if mergeable:
            self.expected.merges += 1
            self.expected.action[self.pending[0]] = "merged"
        elif self.pending is not None:
            self.unmerged()
        inline = activation and spec["inline"] and not spec["bn"]
        if inline:
            layer.activation = keras.activations.get("relu")
        self.apply(layer)
        bn = None
        if spec["bn"] and activation:
            bn = keras.layers.BatchNormalization(name=f"{name}_bn")
            self.apply(bn)
        self.weights.append((layer, bn, spec["inactive"]))
        inactive = spec["inactive"] and self.nonneg
        self.expected.action[name] = "kept"
        self.pending = (name, kind, inline) if inactive and activation else None
        self.through_flatten = False
        if activation:
            if not inline:
                self.apply(keras.layers.ReLU(name=f"{name}_relu"))
            self.nonneg = True
            if spec["dropout"]:
                self.apply(keras.layers.Dropout(0.5, name=f"{name}_dropout"))

    def unmerged(self):
        """The pending layer loses its ReLU but stays a layer of its own."""
        name, _, inline = self.pending
        self.expected.action[name] = "removed-activation" if inline else "kept"
        self.pending = None

    def conv(self, spec):
        extent = (spec["kernel"] - 1) * spec["dilation"] + 1
        stride, dilation = spec["stride"], spec["dilation"]
        if stride > 1:  # Keras refuses strides > 1 together with dilation > 1
            dilation, extent = 1, spec["kernel"]
        if extent > self.size:
            return
        layer = CONV[self.rank](
            spec["width"], spec["kernel"], strides=stride, dilation_rate=dilation,
            name=f"conv{self.expected.affine}",
        )
        self.affine(layer, "conv", spec)
        self.size = (self.size - extent) // stride + 1
        self.channels = spec["width"]

    def pool(self):
        if self.size < 4:
            return
        self.apply(POOL[self.rank](2))
        self.size //= 2
        if self.pending is not None:  # pooling stops a merge, keeps non-negativity
            self.unmerged()

    def residual(self, spec):
        x = self.tensor
        layer = CONV[self.rank](
            self.channels, spec["kernel"], padding="same",
            name=f"conv{self.expected.affine}",
        )
        if self.pending is not None:  # x now feeds two layers
            self.unmerged()
        nonneg_x = self.nonneg
        self.affine(layer, "conv", spec)
        if self.pending is not None:  # its output goes to Add, which it absorbs
            if spec["kernel"] % 2 == 1:  # the identity needs a centre tap
                self.expected.residuals += 1
            self.unmerged()
        self.tensor = keras.layers.Add()([x, self.tensor])
        self.nonneg = nonneg_x

    def flatten(self, how):
        if how == "flatten":
            self.apply(keras.layers.Flatten())
            self.through_flatten = True
        else:
            pool = {1: keras.layers.GlobalAveragePooling1D,
                    2: keras.layers.GlobalAveragePooling2D}[self.rank]
            self.apply(pool())
            if self.pending is not None:
                self.unmerged()

    def model(self):
        for layer, bn, inactive in self.weights:
            kernel, bias = layer.get_weights()
            if inactive:
                kernel = np.abs(kernel)
                bias = self.rng.uniform(0.0, 0.5, bias.shape)
            else:
                kernel.flat[0] = -abs(kernel.flat[0]) - 1.0
            layer.set_weights([kernel, bias])
            if bn is not None:
                c = bias.shape[0]
                beta = self.rng.uniform(0, 1, c) if inactive else self.rng.uniform(-1, 1, c)
                mean = -self.rng.uniform(0, 1, c) if inactive else self.rng.normal(size=c)
                bn.set_weights([self.rng.uniform(0.5, 1.5, c), beta, mean,
                                self.rng.uniform(0.5, 2.0, c)])
        if self.functional:
            return keras.Model(self.input, self.tensor, name="random_functional")
        return keras.Sequential([self.input, *self.layers], name="random_sequential")


def build(spec):
    builder = Builder(spec)
    for kind, block in spec["conv"]:
        getattr(builder, kind)(block) if kind != "pool" else builder.pool()
    builder.flatten(spec["flatten"])
    for i, block in enumerate(spec["dense"]):
        builder.affine(keras.layers.Dense(block["width"], name=f"dense{i}"), "dense", block)
    out = dict(inactive=False, bn=False, inline=False, dropout=False)
    builder.affine(keras.layers.Dense(3, name="logits"), "dense", out, activation=False)
    return builder.model(), builder.expected


def _within_float32_rounding(model, folded):
    """Tiny outputs made by cancellation carry float32 rounding above 1e-5 of
    their size in the original model too. Then the fold must not be worse
    than the original float32 model, both measured against float64."""
    clone = keras.models.clone_model(
        model,
        clone_function=lambda l: l.__class__.from_config({**l.get_config(), "dtype": "float64"}),
    )
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(0).standard_normal((64,) + tuple(model.inputs[0].shape[1:]))
    truth = np.asarray(clone(x, training=False), np.float64)
    x32 = x.astype("float32")
    original = np.max(np.abs(np.asarray(model(x32, training=False)) - truth))
    ours = np.max(np.abs(np.asarray(folded(x32, training=False)) - truth))
    return ours <= 4 * original + 1e-7 * np.max(np.abs(truth))


@settings(max_examples=80)  # ~5 s; fewer rarely reach conv -> Flatten -> Dense
@given(architectures())
def test_random_architectures_fold_as_constructed(spec):
    model, expected = build(spec)
    before = [w.copy() for w in model.get_weights()]
    folded, report = ls.fold(model, policy="depth", verify="random", return_report=True)

    assert report.exact
    assert report.max_relative_error <= 1e-5 or _within_float32_rounding(model, folded)
    residuals = sum(1 for _, members in report.merges if members[-1].startswith("add"))
    assert residuals == expected.residuals
    merged = sum(len(members) - 1 for _, members in report.merges) - residuals
    assert merged == expected.merges
    assert report.after.depth == expected.affine - expected.merges
    actions = {s.name: s.action for s in report.layers}
    assert {name: actions[name] for name in expected.action} == expected.action
    # BatchNormalization right after a linear Dense/Conv always folds away
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert folded.inputs[0].shape == model.inputs[0].shape
    assert folded.outputs[0].shape == model.outputs[0].shape
    assert type(folded) is type(model)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_conv_flatten_dense_merges_exactly_for_any_padding():
    for padding, strides, data_format in [
        ("valid", 1, "channels_last"),
        ("same", 2, "channels_last"),
        ("valid", (2, 1), "channels_first"),  # Flatten's own ordering is kept
    ]:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((9, 8, 3))
        h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
        conv = keras.layers.Conv2D(5, 3, padding=padding, strides=strides,
                                   activation="relu", name="c2")
        h = keras.layers.Flatten(data_format=data_format)(conv(h))
        h = keras.layers.Dense(6, activation="relu", name="d")(h)
        model = keras.Model(inputs, keras.layers.Dense(2)(h))
        conv.set_weights([np.abs(w) + 0.01 for w in conv.get_weights()])
        folded, report = ls.fold(model, policy="depth", verify="random", return_report=True)
        assert report.merges == [("d", ["c2", "d"])]
        assert report.exact and report.max_relative_error <= 1e-5
        assert report.after.depth == 3
        assert [type(l).__name__ for l in folded.layers].count("Conv2D") == 1
        # the merged Dense reads the flattened 7x6x4 (or strided) feature map
        _, cost_report = ls.fold(model, policy="cost", return_report=True)
        assert cost_report.skipped and "cost policy" in cost_report.skipped[0][2]
