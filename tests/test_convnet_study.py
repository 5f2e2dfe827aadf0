"""The convnet study (issue 13): architectures, peers, and one tiny run through the CLI."""

import json
import os

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from helpers import SHARED
from tf_layersparse.experiments import convnet
from tf_layersparse.experiments import convnet_study as study
from tf_layersparse.experiments.cli import main

DATASETS = os.path.join(SHARED, "datasets")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(DATASETS), reason=f"offline datasets not found at {DATASETS}")
NAMES = ["baseline", "baseline_fused", "layer_sparse", "layer_sparse_folded", "refit_warm",
         "refit_fresh", "peer_scratch", "peer_pruned"]


def _make_blocks_inactive(model):
    """Effective weights of every expand and depthwise block >= 0, as if the penalty won."""
    for layer in model.layers:
        if "expand" not in layer.name and "_dw" not in layer.name:
            continue
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = weights
            layer.set_weights([np.abs(gamma) + 0.1, np.abs(beta) + 0.5, np.zeros_like(mean),
                               np.ones_like(var)])
        else:
            layer.set_weights([np.abs(w) for w in weights])


def test_inverted_residual_blocks_collapse_exactly_into_one_conv_each():
    # the point of the padding-first block: expand -> depthwise -> project folds
    # into one 3x3 conv per block, exactly, and the fold is cheaper
    model = convnet.build("mobilenet", small=True)
    _make_blocks_inactive(model)
    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    folded, report = ls.fold(model, nonnegative_inputs=True, verify=x, return_report=True)
    assert report.max_relative_error <= 1e-5
    names = {layer.name for layer in folded.layers}
    assert not any(n.endswith("_dw") or "expand" in n for n in names), names
    assert report.after.depth == report.before.depth - 2 * 2  # two blocks, two layers each
    assert report.after.flops < report.before.flops
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)


def test_every_expand_layer_reads_a_relu_output():
    # post-add ReLU: the expand conv of every block is eligible for the penalty
    model = convnet.build("mobilenet", small=True)
    eligible = {e.name for e in ls.eligible_layers(model, nonnegative_inputs=True)
                if e.eligible}
    expands = {layer.name for layer in model.layers if layer.name.endswith("_expand_conv")}
    assert expands and expands <= eligible


def test_magnitude_pruning_keeps_the_largest_weights_and_masks_hold():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="a"),
                              keras.layers.Dense(3, name="b")])
    before = [np.abs(keras.ops.convert_to_numpy(layer.kernel)) for layer in model.layers]
    masks = convnet.magnitude_prune(model, convnet.kernel_size(model) // 2)
    for layer, magnitude in zip(model.layers, before):
        kept = masks[layer.name].astype(bool)
        assert kept.sum() == magnitude.size // 2  # uniform per layer
        assert magnitude[kept].min() >= magnitude[~kept].max()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 6)), rng.normal(size=(32, 3)), epochs=2, verbose=0,
              callbacks=[convnet.PruneMasks(masks)])
    for layer in model.layers:
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        assert np.all(kernel[masks[layer.name] == 0] == 0)


def test_with_batchnorm_inserts_bn_before_each_conv_activation():
    folded = keras.Sequential([keras.Input((8, 8, 1)),
                               keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                               keras.layers.DepthwiseConv2D(3, name="d1"),
                               keras.layers.GlobalAveragePooling2D(),
                               keras.layers.Dense(2, name="out")])
    model = study.with_batchnorm(folded)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "BatchNormalization", "Activation", "DepthwiseConv2D",
                     "BatchNormalization", "Activation", "GlobalAveragePooling2D", "Dense"]
    assert model.get_layer("c1_act").get_config()["activation"] == "relu"
    assert folded.get_layer("c1").get_config()["activation"] == "relu"  # not mutated


def test_bad_arch_is_refused():
    with pytest.raises(ValueError, match="arch must be one of"):
        convnet.build("resnet")


@needs_shared
@pytest.mark.tf_only  # LiteRT conversion needs TensorFlow's exporter
def test_tiny_study_through_the_cli_writes_the_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study.StudyConfig, "quick", classmethod(
        lambda cls, arch="mobilenet": cls.tiny(arch)))
    out = str(tmp_path / "out")
    assert main(["convnet", "--quick", "--dataset", "fashion_mnist", "--data-dir", DATASETS,
                 "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "[1/9] baseline trained" in printed and "final:" in printed  # progress shown
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"dataset", "final", "models"}
    assert summary["dataset"] == "fashion_mnist"
    assert [m["name"] for m in summary["models"]] == NAMES
    assert summary["final"] in ("layer_sparse_folded", "refit_warm", "refit_fresh")
    rows = {m["name"]: m for m in summary["models"]}
    for row in rows.values():
        assert set(row) == set(study.SUMMARY_FIELDS)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert isinstance(row["conv_layers"], int) and row["conv_layers"] >= 1
        assert row["params"] > 0 and row["flops"] > 0
        for key in ("latency_ms_batch1", "latency_ms_batch64", "tflite_kb",
                    "tflite_ms_batch1"):
            assert np.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["latency_ms_batch64"] > row["latency_ms_batch1"] / 4
        model = keras.saving.load_model(os.path.join(out, row["path"]))
        assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    # fused and folded models compute what their sources compute
    assert rows["baseline_fused"]["accuracy"] == pytest.approx(rows["baseline"]["accuracy"])
    assert rows["layer_sparse_folded"]["accuracy"] == pytest.approx(
        rows["layer_sparse"]["accuracy"], abs=1 / 256)
    assert rows["baseline_fused"]["params"] < rows["baseline"]["params"]  # BN gone
    assert rows["peer_pruned"]["params"] <= rows["baseline_fused"]["params"]
    for name in ("refit_warm", "refit_fresh"):
        assert rows[name]["conv_layers"] == rows["layer_sparse_folded"]["conv_layers"]
    for name in ("table.md", "details.json", "pareto.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "table.md")) as f:
        assert f"**{summary['final']}**" in f.read()
