"""The convnet study (issue 13): does layer sparsity make a convnet faster at
the same accuracy, and better than the alternatives?

`run_convnet_study` trains and measures, on one data set and one family
(`convnet.build`), these models (all saved as `.keras`, input (28, 28, 1)
float32 in [0, 1], output 10 logits):

- `baseline`: trained with the study's recipe (`convnet.TrainConfig`).
- `baseline_fused`: `ls.fold` of the baseline, which fuses each
  BatchNormalization into its conv. Every deployment does this (LiteRT
  too), so all speed-ups are judged against it; its own gain over the
  baseline is never counted as layer sparsity's.
- `layer_sparse`: the baseline fine-tuned with `ls.apply_layer_sparsity`
  (`nonnegative_inputs=True`: pixels) for each strength of a small grid;
  the strength kept is the one whose folded model has the fewest FLOPs
  among those within `tolerance` (0.3 points) of the baseline's
  validation accuracy, else the most accurate one.
- `layer_sparse_folded`: its `ls.fold` (default policy: no merge that
  grows FLOPs or parameters), exact.
- `refit_warm` / `refit_fresh`: `ls.refit` of it from the folded weights /
  from a fresh initialisation.
- `peer_scratch`: the folded architecture with a BatchNormalization after
  each conv, trained from scratch with the baseline's recipe, then fused.
- `peer_pruned`: the baseline pruned by weight magnitude (uniform per
  layer) to the folded model's parameter count, fine-tuned with the masks,
  then fused. Dense kernels with zeros are no faster in Keras or LiteRT,
  so its latency and file size are the fused baseline's; `params` counts
  its non-zero weights.

Validation images (held out from the training split) choose the strength
and the `final` model: the refit or folded model with the best validation
accuracy (ties: the faster one). Test images are used for reporting only.
"""

import dataclasses
import json
import os
import platform
import time

import keras
import numpy as np

import tf_layersparse as ls
from tf_layersparse.experiments import convnet
from tf_layersparse.experiments import convnet_measure as measure

__all__ = [
    "StudyConfig",
    "SUMMARY_FIELDS",
    "run_convnet_study",
    "split_data",
    "with_batchnorm",
    "choose_strength",
    "choose_final",
    "summary_markdown",
    "plot_pareto",
]

SUMMARY_FIELDS = ("name", "accuracy", "conv_layers", "params", "flops", "latency_ms_batch1",
                  "latency_ms_batch64", "tflite_kb", "tflite_ms_batch1", "path")
REFERENCE = "baseline_fused"


@dataclasses.dataclass
class StudyConfig:
    """Sizes of one run; `quick()` and `tiny()` give the CLI's and the test's."""

    arch: str = "mobilenet"
    n_train: int = 12_000
    n_val: int = 2_000
    n_test: int = 10_000
    epochs: int = 5              # baseline and peer_scratch
    sparse_epochs: int = 3       # layer-sparse fine-tune of the baseline
    refit_epochs: int = 2        # refit_warm, refit_fresh (x2: from scratch), peer_pruned
    strengths: tuple = (0.5, 1.0, 2.0)
    batch_size: int = 64
    learning_rate: float = 0.05
    fine_tune_rate: float = 0.01  # refit_warm, peer_pruned
    tolerance: float = 0.003     # accuracy loss accepted when choosing the strength
    latency_repeats: int = 15
    tflite_threads: int = 2
    small: bool = False
    seed: int = 0

    @classmethod
    def quick(cls, arch="mobilenet"):
        """Minutes on 2 cores; still ends with a shallower, faster model."""
        return cls(arch=arch, n_train=4000, n_val=1000, n_test=2000, epochs=2,
                   sparse_epochs=2, refit_epochs=1, strengths=(8.0,), latency_repeats=7)

    @classmethod
    def tiny(cls, arch="mobilenet"):
        """A small network on a few hundred images: checks the pipeline (tests)."""
        return cls(arch=arch, n_train=512, n_val=256, n_test=256, epochs=1,
                   sparse_epochs=1, refit_epochs=1, strengths=(4.0,), latency_repeats=3,
                   small=True)

    def recipe(self, epochs, learning_rate=None):
        return convnet.TrainConfig(epochs=epochs, batch_size=self.batch_size,
                                   learning_rate=learning_rate or self.learning_rate,
                                   seed=self.seed)


def split_data(images, config):
    """(x_train, y_train, x_val, y_val, x_test, y_test) as (n, 28, 28, 1) images.

    Validation images are the training split's, disjoint from the training
    subset; a KMNIST substitute (one split only) is cut into three parts.

    >>> from tf_layersparse.experiments.datasets import Images
    >>> flat = np.zeros((50, 784), "float32"); labels = np.arange(50) % 10
    >>> images = Images("toy", flat, labels, flat[:20], labels[:20], "toy")
    >>> [len(a) for a in split_data(images, StudyConfig(n_train=30, n_val=10, n_test=5))]
    [30, 30, 10, 10, 5, 5]
    """
    rng = np.random.default_rng(config.seed)
    if images.x_test is None:  # KMNIST substitute: disjoint parts of its one split
        order = rng.permutation(len(images.x_train))
        n_test = min(config.n_test, len(order) // 3)
        test, order = order[:n_test], order[n_test:]
        x_all, y_all = images.x_train, images.y_train
        x_test, y_test = x_all[test], y_all[test]
    else:
        order = rng.permutation(len(images.x_train))
        x_all, y_all = images.x_train, images.y_train
        x_test, y_test = images.x_test[:config.n_test], images.y_test[:config.n_test]
    train = order[:config.n_train]
    val = order[config.n_train:config.n_train + config.n_val]
    image = convnet.to_images
    return (image(x_all[train]), y_all[train], image(x_all[val]), y_all[val],
            image(x_test), np.asarray(y_test))


def _copy(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def with_batchnorm(model, seed=0):
    """A freshly initialised copy of `model` with a BatchNormalization after every
    conv (before its activation): the folded architecture as one would train it.

    >>> folded = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
    ...     keras.layers.Dense(2)])
    >>> [type(l).__name__ for l in with_batchnorm(folded).layers[1:]]
    ['Conv2D', 'BatchNormalization', 'Activation', 'Flatten', 'Dense']
    """
    keras.utils.set_random_seed(seed)
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, convs):
            config = dict(config, activation="linear", use_bias=False)
        return layer.__class__.from_config(config)

    def call_layer(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if not isinstance(layer, convs):
            return out
        out = keras.layers.BatchNormalization(momentum=convnet.BN_MOMENTUM,
                                              name=f"{layer.name}_bn")(out)
        original = model.get_layer(layer.name).get_config().get("activation", "linear")
        return keras.layers.Activation(original, name=f"{layer.name}_act")(out)

    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return keras.models.clone_model(model, clone_function=clone_layer,
                                    call_function=call_layer)


def choose_strength(trials, reference_accuracy, tolerance):
    """Index of the trial with the fewest FLOPs among those whose validation accuracy
    is at least `reference_accuracy - tolerance`; else of the most accurate one.

    `trials` are dicts with `val_accuracy` and `flops` (of the folded model).

    >>> trials = [dict(val_accuracy=0.90, flops=10), dict(val_accuracy=0.898, flops=6),
    ...           dict(val_accuracy=0.85, flops=2)]
    >>> choose_strength(trials, 0.90, 0.003), choose_strength(trials, 0.95, 0.003)
    (1, 0)
    """
    good = [i for i, t in enumerate(trials) if t["val_accuracy"] >= reference_accuracy - tolerance]
    if good:
        return min(good, key=lambda i: (trials[i]["flops"], -trials[i]["val_accuracy"]))
    return max(range(len(trials)), key=lambda i: trials[i]["val_accuracy"])


def choose_final(candidates):
    """Name of the candidate with the best validation accuracy (ties: lower batch-1 latency).

    >>> choose_final({"a": dict(val_accuracy=0.9, latency=2.0),
    ...               "b": dict(val_accuracy=0.9, latency=1.0)})
    'b'
    """
    return min(candidates, key=lambda n: (-candidates[n]["val_accuracy"],
                                          candidates[n]["latency"]))


class _Stopwatch:
    def __init__(self, log, steps):
        self.log, self.steps, self.step, self.start = log, steps, 0, time.perf_counter()

    def __call__(self, message):
        self.step += 1
        self.log(f"[{self.step}/{self.steps}] {message} "
                 f"({time.perf_counter() - self.start:.0f} s elapsed)")


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fold(model):
    return ls.fold(model, nonnegative_inputs=True, return_report=True)


def _train_layer_sparse(baseline, strength, data, config, log):
    x, y, x_val, y_val = data[:4]
    model = ls.apply_layer_sparsity(baseline, strength, nonnegative_inputs=True)
    recipe = config.recipe(config.sparse_epochs)
    convnet.train(model, x, y, recipe, log=log, tag=f"layer_sparse s={strength:g}",
                  callbacks=[ls.ActiveLayers()])
    folded, report = _fold(model)
    return dict(strength=strength, model=model, folded=folded, report=report,
                val_accuracy=convnet.accuracy(folded, x_val, y_val),
                flops=ls.model_cost(folded).flops, depth=ls.model_cost(folded).depth)


def _refit(model, data, config, warm, log):
    x, y = data[:2]
    epochs = config.refit_epochs * (1 if warm else 2)
    recipe = config.recipe(epochs, config.fine_tune_rate if warm else None)
    tag = "refit_warm" if warm else "refit_fresh"
    steps = -(-len(x) // config.batch_size)
    progress = _EpochLog(log, tag, epochs)
    # the same fold as the study's (cost policy), not refit's default "depth"
    refitted, _ = ls.refit(model, x, y, nonnegative_inputs=True, policy="cost",
                           warm_start=warm,
                           seed=config.seed + 1, optimizer=recipe.optimizer(steps),
                           loss=_loss(), metrics=["accuracy"], epochs=epochs,
                           batch_size=config.batch_size, verbose=0, callbacks=[progress])
    return refitted


class _EpochLog(keras.callbacks.Callback):
    def __init__(self, log, tag, epochs):
        super().__init__()
        self.log, self.tag, self.epochs, self.start = log, tag, epochs, time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items())
        self.log(f"  {self.tag} epoch {epoch + 1}/{self.epochs}: {shown} "
                 f"({time.perf_counter() - self.start:.0f} s)")


def _peer_pruned(baseline, target_params, data, config, log):
    x, y = data[:2]
    pruned = _copy(baseline)
    fused_cost = ls.model_cost(ls.fold(baseline, nonnegative_inputs=True))
    fixed = fused_cost.params - convnet.kernel_size(baseline)  # biases after fusion
    keep = max(0, target_params - fixed)
    masks = convnet.magnitude_prune(pruned, keep)
    log(f"  peer_pruned: keeping {keep:,} of {convnet.kernel_size(baseline):,} kernel weights")
    recipe = config.recipe(config.refit_epochs, config.fine_tune_rate)
    convnet.train(pruned, x, y, recipe, log=log, tag="peer_pruned",
                  callbacks=[convnet.PruneMasks(masks)])
    return ls.fold(pruned, nonnegative_inputs=True)


def _row(name, model, accuracy, out, params=None):
    cost = ls.model_cost(model)
    path = f"{name}.keras"
    model.save(os.path.join(out, path))
    return dict(name=name, accuracy=accuracy, conv_layers=int(cost.depth),
                params=int(cost.params if params is None else params), flops=int(cost.flops),
                path=path)


def run_convnet_study(images, config, out, log=print):
    """Train, fold, refit and measure every model of the module docstring on `images`.

    Writes `summary.json` (the issue's schema), `details.json` (config, grid,
    fold report, validation accuracies, machine, wall time), `table.md`,
    `pareto.png` (with matplotlib) and one `.keras` file per model to
    `out`; returns the summary dict.
    """
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    step = _Stopwatch(log, 9)
    data = split_data(images, config)
    x, y, x_val, y_val, x_test, y_test = data
    log(f"{images.name} ({images.source}): {len(x)} training, {len(x_val)} validation, "
        f"{len(x_test)} test images; {config.arch}")

    baseline = convnet.build(config.arch, seed=config.seed, small=config.small)
    log(f"baseline: {ls.model_cost(baseline)}")
    convnet.train(baseline, x, y, config.recipe(config.epochs), log=log, tag="baseline")
    base_val = convnet.accuracy(baseline, x_val, y_val)
    step(f"baseline trained: validation accuracy {base_val:.4f}")

    fused, fused_report = _fold(baseline)
    step(f"baseline fused: {fused_report.after}, max rel. error "
         f"{fused_report.max_relative_error:.1e}")

    trials = []
    for strength in config.strengths:
        trial = _train_layer_sparse(baseline, strength, data, config, log)
        log(f"  strength {strength:g}: folded {trial['report'].after}; validation accuracy "
            f"{trial['val_accuracy']:.4f}")
        trials.append(trial)
    chosen = trials[choose_strength(trials, base_val, config.tolerance)]
    sparse, folded, report = chosen["model"], chosen["folded"], chosen["report"]
    step(f"layer sparsity: strength {chosen['strength']:g} chosen; folded "
         f"{report.before.depth} -> {report.after.depth} affine layers, max rel. error "
         f"{report.max_relative_error:.1e}")

    refit_warm = _refit(sparse, data, config, True, log)
    step("refit warm done")
    refit_fresh = _refit(sparse, data, config, False, log)
    step("refit fresh done")

    scratch = with_batchnorm(folded, seed=config.seed + 2)
    convnet.train(scratch, x, y, config.recipe(config.epochs), log=log, tag="peer_scratch")
    scratch = ls.fold(scratch, nonnegative_inputs=True)
    step("peer: folded architecture from scratch done")

    pruned = _peer_pruned(baseline, ls.model_cost(folded).params, data, config, log)
    step("peer: magnitude-pruned baseline done")

    models = {"baseline": baseline, "baseline_fused": fused, "layer_sparse": sparse,
              "layer_sparse_folded": folded, "refit_warm": refit_warm,
              "refit_fresh": refit_fresh, "peer_scratch": scratch, "peer_pruned": pruned}
    rows = {}
    for name, model in models.items():
        params = convnet.nonzero_params(model) if name == "peer_pruned" else None
        rows[name] = _row(name, model, convnet.accuracy(model, x_test, y_test), out, params)
    _measure(models, rows, out, config)
    step("latency measured (Keras batch 1 and 64, LiteRT batch 1)")

    val = {n: convnet.accuracy(models[n], x_val, y_val)
           for n in ("layer_sparse_folded", "refit_warm", "refit_fresh")}
    final = choose_final({n: dict(val_accuracy=val[n], latency=rows[n]["latency_ms_batch1"])
                          for n in val})
    summary = dict(dataset=images.name, final=final,
                   models=[{k: rows[n][k] for k in SUMMARY_FIELDS} for n in models])
    wall = time.perf_counter() - start
    details = dict(
        config=dataclasses.asdict(config), source=images.source,
        machine=f"{platform.platform()}, {os.cpu_count()} CPU cores",
        wall_seconds=wall, baseline_val_accuracy=base_val, final_val_accuracy=val,
        grid=[dict(strength=t["strength"], val_accuracy=t["val_accuracy"],
                   folded_flops=t["flops"], folded_depth=t["depth"]) for t in trials],
        strength=chosen["strength"], fold=_report_dict(report),
        fused_baseline=_report_dict(fused_report))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "details.json"), "w") as f:
        json.dump(details, f, indent=1, default=str)
    table = summary_markdown(summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    from tf_layersparse.experiments import report as report_module

    if report_module.plots_available():
        plot_pareto(summary, os.path.join(out, "pareto.png"))
    log("\n" + table)
    log(f"final: {final}; {wall:.0f} s in all")
    return summary


def _report_dict(report):
    return dict(before=str(report.before), after=str(report.after),
                max_relative_error=report.max_relative_error,
                skipped=[list(map(str, s)) for s in report.skipped])


def _measure(models, rows, out, config):
    repeats = config.latency_repeats
    for batch in (1, 64):
        times = measure.keras_latency(models, batch, repeats=repeats,
                                      number=5 if batch == 1 else 2)
        for name, ms in times.items():
            rows[name][f"latency_ms_batch{batch}"] = ms
    paths = {}
    for name, model in models.items():
        paths[name] = os.path.join(out, f"{name}.tflite")
        rows[name]["tflite_kb"] = measure.to_tflite(model, paths[name])
    times = measure.tflite_latency(paths, repeats=repeats, threads=config.tflite_threads)
    for name, ms in times.items():
        rows[name]["tflite_ms_batch1"] = ms


def summary_markdown(summary):
    """Markdown table of a summary: one line per model, speed-ups against the fused
    baseline, the recommended model in bold.

    >>> row = dict(name="baseline_fused", accuracy=0.9, conv_layers=3, params=100,
    ...            flops=2_000_000, latency_ms_batch1=2.0, latency_ms_batch64=10.0,
    ...            tflite_kb=4.0, tflite_ms_batch1=0.5, path="baseline_fused.keras")
    >>> print(summary_markdown(dict(dataset="d", final="baseline_fused", models=[row])))
    | model | accuracy (%) | conv/dense layers | params | MFLOPs | Keras ms b1 | Keras ms b64 | speed-up b1 / b64 | TFLite KB | TFLite ms b1 |
    |---|---|---|---|---|---|---|---|---|---|
    | **baseline_fused** | 90.00 | 3 | 100 | 2.00 | 2.00 | 10.00 | 1.00x / 1.00x | 4.0 | 0.500 |
    <BLANKLINE>
    """
    rows = summary["models"]
    ref = next((r for r in rows if r["name"] == REFERENCE), rows[0])
    lines = ["| model | accuracy (%) | conv/dense layers | params | MFLOPs | Keras ms b1 "
             "| Keras ms b64 | speed-up b1 / b64 | TFLite KB | TFLite ms b1 |",
             "|" + "---|" * 10]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] == summary["final"] else r["name"]
        speed = (f"{ref['latency_ms_batch1'] / r['latency_ms_batch1']:.2f}x / "
                 f"{ref['latency_ms_batch64'] / r['latency_ms_batch64']:.2f}x")
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f} | {r['conv_layers']} | {r['params']:,} | "
            f"{r['flops'] / 1e6:.2f} | {r['latency_ms_batch1']:.2f} | "
            f"{r['latency_ms_batch64']:.2f} | {speed} | {r['tflite_kb']:.1f} | "
            f"{r['tflite_ms_batch1']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary, path):
    """Accuracy against Keras batch-1 latency, one labelled point per model, the
    Pareto front (faster and at least as accurate) as a line; PNG at `path`."""
    from tf_layersparse.experiments.report import _pyplot

    plt = _pyplot()
    rows = sorted(summary["models"], key=lambda r: r["latency_ms_batch1"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front, best = [], -1.0
    for r in rows:
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["latency_ms_batch1"] for r in front], [100 * r["accuracy"] for r in front],
            "-", color="0.7", zorder=0, label="Pareto front")
    for r in rows:
        final = r["name"] == summary["final"]
        ax.scatter(r["latency_ms_batch1"], 100 * r["accuracy"], s=60 if final else 30,
                   marker="*" if final else "o")
        ax.annotate(r["name"], (r["latency_ms_batch1"], 100 * r["accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("Keras compiled predict, batch 1 (ms, CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['dataset']}: accuracy vs latency (final: {summary['final']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
