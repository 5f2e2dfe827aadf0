"""The convnet study: architectures, peers, resumable runs, and one tiny study through the CLI."""

import json
import os
import sys

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from helpers import SHARED
from tf_layersparse.experiments import convnet, peers
from tf_layersparse.experiments import convnet_study as study
from tf_layersparse.experiments import convnet_summary
from tf_layersparse.experiments.cli import main

DATASETS = os.path.join(SHARED, "datasets")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(DATASETS), reason=f"offline datasets not found at {DATASETS}")
MODELS = {"baseline", "target_finetune_every", "target_scratch_every", "refit_warm_finetune_every",
          "refit_warm_scratch_every", "refit_fresh_finetune_every", "refit_fresh_scratch_every",
          "peer_bn_scratch_every", "peer_data_free_every", "peer_shallower_every",
          "peer_linearised_every", "peer_pruned_every"}


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
    model = peers.with_batchnorm(folded)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "BatchNormalization", "Activation", "DepthwiseConv2D",
                     "BatchNormalization", "Activation", "GlobalAveragePooling2D", "Dense"]
    assert model.get_layer("c1_act").get_config()["activation"] == "relu"
    assert folded.get_layer("c1").get_config()["activation"] == "relu"  # not mutated


@pytest.mark.backend_independent
def test_bad_arch_is_refused():
    with pytest.raises(ValueError, match="arch must be one of"):
        convnet.build("resnet")


def test_data_free_peer_collapses_as_many_blocks_as_asked():
    net = convnet.build("mobilenet", small=True)
    removable = peers.removable_layers(net)
    assert len(removable) == 4  # two blocks: expand and depthwise each
    full = ls.model_cost(ls.fold(net, nonnegative_inputs=True)).depth
    for blocks in (0, 1, 2):
        peer = peers.data_free_collapse(net, blocks)
        assert ls.model_cost(ls.fold(peer, nonnegative_inputs=True)).depth == full - 2 * blocks
    first = peers.data_free_collapse(net, 1, how="first")
    assert "s0b0_project" in {layer.name for layer in first.layers}  # s0b0 collapsed
    assert "s1b0_expand_conv" in {layer.name for layer in first.layers}


def test_shallower_net_is_the_closest_in_flops():
    net = convnet.build("mobilenet", small=True)
    fused = ls.model_cost(ls.fold(net, nonnegative_inputs=True)).flops
    blocks, model = peers.shallower_net(fused, small=True)
    assert blocks == (1, 1)  # the net itself is the closest to its own FLOPs
    blocks, model = peers.shallower_net(0.7 * fused, small=True)
    assert sum(blocks) == 1
    assert ls.model_cost(ls.fold(model, nonnegative_inputs=True)).flops < fused


def test_linearised_units_fold_away_exactly():
    net = convnet.build("mobilenet", small=True)
    model, units = peers.linearisable(net, 0.01)
    for i, unit in enumerate(units):
        model.get_layer(unit).slope.assign([i / len(units)])
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    plain, chosen = peers.linearise(model, units, 2)
    assert chosen == units[-1:-3:-1]  # the largest slopes
    folded, report = ls.fold(plain, nonnegative_inputs=True, verify=x, return_report=True)
    assert report.max_relative_error <= 1e-5
    assert report.after.depth == report.before.depth - 2


@pytest.mark.backend_independent
def test_plan_orders_dependencies_first_and_names_models_without_seeds():
    config = study.StudyConfig(fractions=("every", 0.8), seeds=(0, 1))
    runs = study.plan_runs(config)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    for i, run in enumerate(runs):
        if run.source:
            source = run.source.replace("_trained", "")
            assert source in names[:i], (run.name, source)
    assert {r.config for r in runs if r.seed == 1} == {r.config for r in runs if r.seed == 0}
    # every seed's every-layer runs come before the other fractions'
    first_other = min(i for i, r in enumerate(runs) if r.fraction == 0.8)
    assert all(r.fraction != "every" or r.kind == "refit_fresh" for r in runs[first_other:])


@pytest.mark.backend_independent
def test_final_model_is_chosen_on_validation_only():
    models = {"baseline": dict(val_accuracy=0.90, latency_ms_batch1=2.0),
              "target_a": dict(val_accuracy=0.80, latency_ms_batch1=0.5),
              "refit_b": dict(val_accuracy=0.899, latency_ms_batch1=1.0),
              "peer_c": dict(val_accuracy=0.95, latency_ms_batch1=0.1)}
    assert convnet_summary.choose_final(models, 0.005) == "refit_b"  # peers never chosen
    assert convnet_summary.choose_final(models, 0.2) == "target_a"


@needs_shared
@pytest.mark.tf_only  # LiteRT conversion needs TensorFlow's exporter
def test_tiny_study_through_the_cli_writes_the_schema_and_resumes(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(study.StudyConfig, "quick", classmethod(
        lambda cls, arch="mobilenet": cls.tiny(arch)))
    out = str(tmp_path / "out")
    arguments = ["convnet", "--quick", "--dataset", "fashion_mnist", "--data-dir", DATASETS,
                 "--out", out]
    assert main(arguments + ["--only", "baseline_*", "--no-report"]) == 0
    assert list(study.read_runs(out)) == ["baseline_s0"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "1 of 12 runs already done" in printed and "recommended:" in printed
    runs = study.read_runs(out)
    assert len(runs) == 12 and {r["config"] for r in runs.values()} == MODELS
    for row in runs.values():
        assert row["curve"] and all(0 <= v <= 1 for v in row["curve"]), row["name"]
        if row["kind"] == "target":
            assert row["fold_error"] <= 1e-5
            assert 0 <= row["training_mode_test_accuracy"] <= 1
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"dataset", "final", "reference", "tolerance", "models"}
    assert summary["dataset"] == "fashion_mnist"
    assert {m["name"] for m in summary["models"]} == MODELS
    assert summary["final"].startswith(("target_", "refit_"))
    rows = {m["name"]: m for m in summary["models"]}
    for row in rows.values():
        assert set(row) == set(convnet_summary.SUMMARY_FIELDS)
        assert row["seeds"] == [0]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy_std"] == 0.0
        assert row["conv_layers"] >= 1 and row["params"] > 0 and row["flops"] > 0
        for key in ("latency_ms_batch1", "latency_ms_batch64", "tflite_kb",
                    "tflite_ms_batch1", "tflite_ms_batch1_1thread", "int8_ms_batch1"):
            assert np.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert 0.0 <= row["int8_accuracy"] <= 1.0
        model = keras.saving.load_model(os.path.join(out, row["path"]))
        assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    # a target run's fold holds what the target removed: no more layers than the baseline
    assert rows["target_scratch_every"]["conv_layers"] <= rows["baseline"]["conv_layers"]
    assert rows["peer_pruned_every"]["params"] <= rows["baseline"]["params"]
    assert os.listdir(os.path.join(out, "recommended"))
    for name in ("table.md", "pareto.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "table.md")) as f:
        assert f"**{summary['final']}**" in f.read()
    # the other backends' latency reads the same summary (here on this backend)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        import study_latency
    finally:
        sys.path.pop(0)
    assert study_latency.main([out, "--repeats", "2"]) == 0
    with open(os.path.join(out, f"latency_{keras.backend.backend()}.md")) as f:
        table = f.read()
    assert "| baseline | " in table and "1.00x / 1.00x" in table


@needs_shared
def test_cifar10_baseline_trains_on_augmented_colour_images(tmp_path, monkeypatch):
    monkeypatch.setattr(study.StudyConfig, "quick", classmethod(
        lambda cls, arch="mobilenet": cls.tiny(arch)))
    out = str(tmp_path / "cifar")
    assert main(["convnet", "--quick", "--dataset", "cifar10", "--data-dir", DATASETS,
                 "--out", out, "--only", "baseline_*", "--no-report"]) == 0
    row = study.read_runs(out)["baseline_s0"]
    assert len(row["curve"]) == 2 and 0.0 <= row["test_accuracy"] <= 1.0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["augment"] is True
    model = keras.saving.load_model(os.path.join(out, row["path"]))
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert not any("random" in layer.name for layer in model.layers)  # augmentation stays in the data


def test_augmenter_shifts_by_whole_pixels_and_fills_zeros():
    x = np.arange(2 * 8 * 8 * 1, dtype="float32").reshape(2, 8, 8, 1) + 1.0
    out = x
    shift = convnet.augmenter((8, 8, 1), seed=3)[0]  # 4 of 8 pixels here
    out = keras.ops.convert_to_numpy(shift(x, training=True))
    for image, source in zip(out, x):
        kept = image[image > 0]
        assert set(kept.tolist()) <= set(source.ravel().tolist())  # no interpolated values
    assert np.array_equal(keras.ops.convert_to_numpy(shift(x, training=False)), x)
