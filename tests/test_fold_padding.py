"""Exact merges through zero padding: the bias-map route.

A per-position affine layer with a bias (1x1 convolution or Dense on
channels, with or without BatchNormalization) before a 'same'-padded or
`ZeroPadding`-then-'valid' convolution merges exactly with a bias map (a
`BiasMap` layer after the merged convolution); a `ZeroPadding -> k x k
'valid' -> Add` with the kernel centred becomes one 'same' convolution with
the identity in its centre tap. Random graphs check both against the
original on fresh inputs (max relative error <= 1e-5) and check the route
the report gives; MobileNetV2 as Keras builds it folds block by block.
"""

import os

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_layersparse as ls
from helpers import assert_folds_exactly, make_nonnegative, saved_and_loaded, to_numpy
from tf_layersparse.folding.merge import Affine, compose, same_pads
from zoo import inactive_mobilenetv2


@st.composite
def padded_blocks(draw):
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    return dict(
        size=(draw(st.integers(4, 9)), draw(st.integers(4, 9))),
        known=draw(st.booleans()),
        first=draw(st.sampled_from(["conv1x1", "dense"])),
        use_bias=draw(st.booleans()),
        bn=draw(st.booleans()),
        width=draw(st.integers(1, 5)),
        pad=draw(st.one_of(st.none(), st.tuples(*(st.tuples(st.integers(0, 2), st.integers(0, 2))
                                                  for _ in range(2))))),
        second=draw(st.sampled_from(["conv", "depthwise"])),
        padding=draw(st.sampled_from(["same", "valid"])),
        kernel=kernel,
        stride=stride,
        dilation=1 if stride > 1 else draw(st.integers(1, 2)),
        project=draw(st.booleans()),
        residual=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _bn(layer, rng):
    c = layer.gamma.shape[0]
    layer.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(0.0, 0.5, c),
                       -rng.uniform(0.0, 0.5, c), rng.uniform(0.5, 2.0, c)])


def _build(spec):
    """The block and what fold should do with it: (model, merged layer name,
    expected route or None when the merge must be refused, Add fused?)."""
    keras.utils.set_random_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    channels = 3
    shape = spec["size"] if spec["known"] else (None, None)
    inputs = keras.Input(shape + (channels,))
    if spec["first"] == "dense":
        first = keras.layers.Dense(spec["width"], use_bias=spec["use_bias"], name="first")
    else:
        first = keras.layers.Conv2D(spec["width"], 1, use_bias=spec["use_bias"], name="first")
    h = first(inputs)
    bn = None
    if spec["bn"]:
        bn = keras.layers.BatchNormalization(name="first_bn")
        h = bn(h)
    h = keras.layers.ReLU()(h)
    pad = spec["pad"]
    if pad is not None:
        h = keras.layers.ZeroPadding2D(pad, name="pad")(h)
    kwargs = dict(strides=spec["stride"], dilation_rate=spec["dilation"],
                  padding=spec["padding"], use_bias=True, name="second")
    if spec["second"] == "depthwise":
        second = keras.layers.DepthwiseConv2D(spec["kernel"], **kwargs)
    else:
        second = keras.layers.Conv2D(int(rng.integers(1, 5)), spec["kernel"], **kwargs)
    h = second(h)
    last = second
    if spec["project"] or spec["residual"]:
        h = keras.layers.ReLU()(h)
        last = keras.layers.Conv2D(channels if spec["residual"] else 2, 1, name="project")
        h = last(h)
    fused = False
    if spec["residual"] and tuple(h.shape[1:]) == tuple(inputs.shape[1:]) and spec["known"]:
        h = keras.layers.Add(name="add")([inputs, h])
        extent = (spec["kernel"] - 1) * spec["dilation"] + 1
        own = [same_pads(n, spec["kernel"], 1, spec["dilation"]) if spec["padding"] == "same"
               else (0, 0) for n in spec["size"]]
        pads = [(a + c, b + d) for (a, b), (c, d) in zip(pad or ((0, 0), (0, 0)), own)]
        fused = spec["stride"] == 1 and extent % 2 == 1 and all(
            lo == hi == (extent - 1) // 2 for lo, hi in pads)
    model = keras.Model(inputs, h, name="padded_block")
    for layer in (first, second, last):
        make_nonnegative(layer)
    if spec["use_bias"]:
        w = first.get_weights()
        first.set_weights([w[0], rng.uniform(0.1, 0.5, w[1].shape)])
    if bn is not None:
        _bn(bn, rng)
    # does the first layer's bias meet zero padding?
    spatial = spec["size"]
    padded = [n + lo + hi for n, (lo, hi) in zip(spatial, pad or ((0, 0), (0, 0)))]
    same = spec["padding"] == "same" and any(
        same_pads(n, spec["kernel"], spec["stride"], spec["dilation"]) != (0, 0) for n in padded)
    if not spec["known"]:  # 'same' pads nothing whatever the size only for 1x1 windows
        extent = (spec["kernel"] - 1) * spec["dilation"] + 1
        same = spec["padding"] == "same" and extent > 1
    meets = (spec["use_bias"] or spec["bn"]) and (pad is not None and any(map(any, pad)) or same)
    route = "exact, bias map" if meets else "exact"
    if meets and not spec["known"]:
        route = None
    return model, last.name, route, fused


def _valid(spec):
    """Keras needs the padded input to hold the dilated kernel."""
    pad = spec["pad"] or ((0, 0), (0, 0))
    extent = (spec["kernel"] - 1) * spec["dilation"] + 1
    sizes = spec["size"] if spec["known"] else (5, 5)  # probe_inputs' size for unknown axes
    return spec["padding"] == "same" or all(
        n + lo + hi >= extent for n, (lo, hi) in zip(sizes, pad))


# JAX compiles every new shape of an eager op: fewer graphs there keep the file short
@settings(max_examples=30 if keras.backend.backend() == "tensorflow" else 12, deadline=None)
@given(padded_blocks())
def test_random_padded_blocks_merge_exactly_by_the_predicted_route(spec):
    if not _valid(spec):
        return
    model, last, route, fused = _build(spec)
    folded, report = assert_folds_exactly(model, nonnegative_inputs=True, policy="depth")
    assert report.exact
    if route is None:  # unknown spatial size: the map cannot be computed
        reasons = [reason for first, _, reason in report.skipped if first == "first"]
        assert reasons and "known spatial size" in reasons[0], report.skipped
        assert not any(isinstance(layer, ls.BiasMap) for layer in folded.layers)
        return
    members = dict(report.merges)[last]
    assert members[:2] == ["first", "second"], report.merges
    assert report.routes[last] == route
    assert ("add" in members) == fused, (members, fused)
    maps = [layer for layer in folded.layers if isinstance(layer, ls.BiasMap)]
    assert len(maps) == (route == "exact, bias map")
    if fused:
        assert not any(isinstance(layer, keras.layers.ZeroPadding2D) for layer in folded.layers)
    assert report.after.depth == 1


def _expand_dw_block(padding_first, residual=True, size=7):
    """x -> 1x1 expand (bias, BN) -> ReLU -> 3x3 depthwise -> ReLU -> 1x1
    project [-> Add x]: with 'same' depthwise (as users write it) or with
    the block input zero-padded first ('valid' depthwise)."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((size, size, 4))
    h = keras.layers.ZeroPadding2D(1, name="pad")(inputs) if padding_first else inputs
    expand = keras.layers.Conv2D(12, 1, name="expand")
    bn = keras.layers.BatchNormalization(name="expand_bn")
    h = keras.layers.ReLU()(bn(expand(h)))
    dw = keras.layers.DepthwiseConv2D(3, padding="valid" if padding_first else "same",
                                      name="dw")
    h = keras.layers.ReLU()(dw(h))
    project = keras.layers.Conv2D(4, 1, name="project")
    h = project(h)
    if residual:
        h = keras.layers.Add(name="add")([inputs, h])
    model = keras.Model(inputs, h)
    for layer in (expand, dw, project):
        make_nonnegative(layer)
    _bn(bn, rng)
    return model


@pytest.mark.parametrize("padding_first", [False, True], ids=["same", "zero_padding_first"])
def test_inverted_residual_folds_into_one_same_conv_in_either_form(padding_first):
    model = _expand_dw_block(padding_first)
    folded, report = assert_folds_exactly(model, nonnegative_inputs=True)
    assert report.merges == [("project", ["expand", "dw", "project", "add"])]
    # 'same' depthwise: the expand bias meets the padding (bias map);
    # padding first: the expand sees the zeros too, so its bias is ordinary
    assert report.routes == {"project": "exact, bias map" if not padding_first else "exact"}
    kinds = [type(layer).__name__ for layer in folded.layers[1:]]
    assert kinds == (["Conv2D", "BiasMap"] if not padding_first else ["Conv2D"])
    conv = folded.get_layer("project")
    assert conv.padding == "same" and conv.kernel_size == (3, 3)
    assert report.after.flops < report.before.flops
    status = {s.name: s for s in report.layers}
    if padding_first:
        assert status["pad"].action == "removed" and "'same'" in status["pad"].reason
    assert f"({report.routes['project']})" in status["project"].reason


@pytest.mark.parametrize("rank", [1, 3])
def test_conv1d_and_conv3d_merge_through_padding_with_a_bias_map(rank):
    conv = {1: keras.layers.Conv1D, 3: keras.layers.Conv3D}[rank]
    inputs = keras.Input((7,) * rank + (2,))
    expand = conv(3, 1, bias_initializer="ones", name="expand")
    h = keras.layers.ReLU()(expand(inputs))
    if rank == 1:  # explicit, asymmetric padding before a strided 'valid' conv
        h = conv(2, 3, strides=2, name="conv")(keras.layers.ZeroPadding1D((2, 1))(h))
    else:
        h = conv(2, 3, padding="same", name="conv")(h)
    model = keras.Model(inputs, h)
    make_nonnegative(expand)
    folded, report = assert_folds_exactly(model, nonnegative_inputs=True, policy="depth")
    assert report.routes == {"conv": "exact, bias map"}
    assert type(folded.layers[-1]) is ls.BiasMap


def test_zero_padding_then_valid_conv_then_add_is_one_same_conv():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.ZeroPadding2D(2, name="pad")(inputs)
    h = keras.layers.Conv2D(3, 5, name="conv")(h)
    model = keras.Model(inputs, keras.layers.Add(name="add")([h, inputs]))
    folded, report = assert_folds_exactly(model)
    assert report.merges == [("conv", ["conv", "add"])] and report.routes == {"conv": "exact"}
    assert [type(layer).__name__ for layer in folded.layers[1:]] == ["Conv2D"]
    assert folded.get_layer("conv").padding == "same"
    # an off-centre padding cannot hold the identity: nothing changes
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(3, 3)(keras.layers.ZeroPadding2D(((2, 0), (1, 1)))(inputs))
    _, report = assert_folds_exactly(keras.Model(inputs, keras.layers.Add()([h, inputs])))
    assert not report.merges


def test_unknown_spatial_size_is_refused_with_the_reason():
    inputs = keras.Input((None, None, 3))
    expand = keras.layers.Conv2D(6, 1, bias_initializer="ones", name="expand")
    h = keras.layers.ReLU()(expand(inputs))
    dw = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="out")(dw(h)))
    make_nonnegative(expand)
    folded, report = assert_folds_exactly(model, nonnegative_inputs=True, policy="depth")
    assert ("expand", "dw") in [(a, b) for a, b, _ in report.skipped]
    reason = dict(((a, b), r) for a, b, r in report.skipped)[("expand", "dw")]
    assert "known spatial size" in reason
    assert report.merges == [("out", ["dw", "out"])]  # depthwise -> 1x1 still merges
    status = {s.name: s for s in report.layers}
    assert "known spatial size" in status["expand"].reason


def test_same_to_same_kxk_stays_refused_without_approximate():
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(inputs)
    h = keras.layers.Conv2D(3, 3, padding="same", name="b")(h)
    model = keras.Model(inputs, h)
    make_nonnegative(model.get_layer("a"))
    _, report = ls.fold(model, nonnegative_inputs=True, policy="depth", return_report=True)
    assert not report.merges and "approximate=True" in report.skipped[0][2]
    _, report = ls.fold(model, nonnegative_inputs=True, policy="depth", approximate=True,
                        return_report=True)
    assert report.routes == {"b": "approximate"}


@pytest.mark.backend_independent
def test_bias_map_cost_counts_its_table_and_one_addition_per_output():
    expand = Affine("conv", np.ones((1, 1, 2, 3)), np.ones(3), geometry=("valid", (1, 1), (1, 1)))
    dw = Affine("depthwise", np.ones((3, 3, 3, 1)), np.zeros(3), geometry=("same", (1, 1), (1, 1)))
    merged = compose(expand, dw, in_shape=(10, 12))
    assert merged.bias_map.shape == (10, 12, 3)
    # corners see 4 taps of the bias, edges 6, the inside 9
    assert merged.bias_map[0, 0, 0] == 4 and merged.bias_map[0, 5, 0] == 6
    assert merged.bias_map[5, 5, 0] == 9 and merged.bias[0] == 9
    params, flops = merged.cost((None, 10, 12, 3))
    # 3x3x2x3 kernel, no bias, a 3x3x3 table; 2 FLOPs per MAC + 1 per output
    assert params == 54 + 27 and flops == 2 * 54 * 120 + 360
    with pytest.raises(ls.folding.merge.CannotMerge, match="known spatial size"):
        compose(expand, dw, in_shape=(None, 12))


def test_folded_model_with_a_bias_map_survives_a_keras_round_trip(tmp_path):
    model = _expand_dw_block(padding_first=False)
    folded, _ = assert_folds_exactly(model, nonnegative_inputs=True)
    bias_map = next(layer for layer in folded.layers if isinstance(layer, ls.BiasMap))
    config = bias_map.get_config()
    assert ls.BiasMap.from_config(config).get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(bias_map))
    assert restored.get_config() == config
    loaded = saved_and_loaded(folded, tmp_path)
    x = np.abs(np.random.default_rng(3).normal(size=(4, 7, 7, 4))).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(folded(x)))
    assert any(isinstance(layer, ls.BiasMap) for layer in loaded.layers)
    # the loaded model folds again without touching the map
    again, report = assert_folds_exactly(loaded, nonnegative_inputs=True)
    status = {s.name: s for s in report.layers}
    assert status[bias_map.name].reason.startswith("carried over")


def test_bias_map_adds_a_map_expanded_once_and_stores_only_its_table(tmp_path):
    layer = ls.BiasMap(shape=(4, 5), channels=2, repeat_at=(1, 1), table_shape=(3, 3),
                       name="ring")
    model = keras.Sequential([keras.Input((4, 5, 2)), layer])
    table = np.random.default_rng(0).normal(size=(3, 3, 2)).astype("float32")
    layer.set_weights([table])
    rows, cols = [0, 1, 1, 2], [0, 1, 1, 1, 2]
    expected = table[rows][:, cols]
    np.testing.assert_array_equal(to_numpy(model(np.zeros((2, 4, 5, 2), "float32")))[1],
                                  expected)
    # parameters are the table's; the full map is derived, and not saved
    assert ls.model_cost(model).params == table.size
    store = {}
    layer.save_own_variables(store)
    assert list(store) == ["0"] and np.array_equal(to_numpy(store["0"]), table)
    loaded = saved_and_loaded(model, tmp_path)
    np.testing.assert_array_equal(to_numpy(loaded.layers[0].full_map), expected)
    # weights copied model to model stay consistent
    other = keras.Sequential([keras.Input((4, 5, 2)), ls.BiasMap.from_config(layer.get_config())])
    other.set_weights(model.get_weights())
    np.testing.assert_array_equal(to_numpy(other.layers[0].bias_map()), expected)
    with pytest.raises(ValueError, match="'ring'.*table of shape"):
        layer.set_weights([np.zeros((4, 5, 2))])


def test_bias_map_rejects_bad_shapes_naming_the_layer():
    with pytest.raises(ValueError, match="'ring'.*repeat_at"):
        ls.BiasMap(shape=(4, 4), channels=2, repeat_at=(0,), name="ring")
    with pytest.raises(ValueError, match="'ring'.*table_shape"):
        ls.BiasMap(shape=(4, 4), channels=2, repeat_at=(3, 0), table_shape=(3, 3), name="ring")
    layer = ls.BiasMap(shape=(4, 4), channels=2, repeat_at=(0, 0), name="ring")
    with pytest.raises(ValueError, match="'ring'.*input"):
        layer(np.zeros((1, 4, 5, 2), "float32"))


@pytest.mark.tf_only  # the LiteRT converter and model.export are TensorFlow's
def test_folded_bias_map_model_converts_to_tflite_and_exports(tmp_path):
    import tensorflow as tf

    model = _expand_dw_block(padding_first=False)
    folded, _ = assert_folds_exactly(model, nonnegative_inputs=True)
    x = np.abs(np.random.default_rng(4).normal(size=(1, 7, 7, 4))).astype("float32")
    expected = to_numpy(model(x))
    converter = tf.lite.TFLiteConverter.from_keras_model(folded)
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    folded.export(str(tmp_path / "exported"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))  # keep it: it owns the variables
    served = reloaded.serve(tf.constant(x))
    assert np.max(np.abs(served.numpy() - expected)) <= 1e-5 * np.max(np.abs(expected))


@pytest.mark.skipif(keras.backend.backend() == "jax", reason=(
    "building MobileNetV2 eagerly on JAX compiles every initializer and layer call "
    "(over a minute on CPU); the random padded blocks cover the JAX backend"))
def test_keras_mobilenetv2_folds_every_inverted_residual_into_one_conv():
    model = inactive_mobilenetv2((32, 32, 3), alpha=0.35, include_top=False)
    folded, report = assert_folds_exactly(model, nonnegative_inputs=True)
    merged = dict(report.merges)
    for block in range(1, 17):
        members = merged[f"block_{block}_project"]
        assert members[:3] == [f"block_{block}_expand", f"block_{block}_depthwise",
                               f"block_{block}_project"], members
        assert report.routes[f"block_{block}_project"] == "exact, bias map"
    # the first block has no expand layer: depthwise + project, a separable conv
    assert merged["expanded_conv_project"] == ["expanded_conv_depthwise", "expanded_conv_project"]
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert "DepthwiseConv2D" not in kinds and "ZeroPadding2D" not in kinds
    assert "Add" not in kinds and kinds.count("BiasMap") == 16
    assert report.after.flops < report.before.flops
    assert report.after.params < report.before.params
