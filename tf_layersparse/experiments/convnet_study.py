"""The convnet study: does a depth target make a convnet faster at the same
accuracy, and is it better than the other ways to a shallower net?

The study is a list of runs (`plan_runs`), each one training job whose
result is appended to `runs.jsonl` as soon as it finishes; a run already
there is skipped, so an interrupted study resumes where it stopped, and
runs can be added to a study later. Every run gets the same data, and every
model trained from scratch the same budget (`epochs` of the baseline's
SGD recipe); fine-tunes and warm refits get `fine_tune_epochs` more on top of
the model they start from. Per seed and per FLOPs fraction (`fractions`; the
string "every" asks for every layer a fold can remove):

- `baseline`: the family's net (`convnet.build`), trained; its deployable
  form is the BN-fused fold, against which every speed-up is judged.
- `target_scratch` / `target_finetune`: `apply_layer_sparsity` with
  `ActiveLayers(target=DepthTarget(...))`, from a fresh net with the full
  budget, or from the trained baseline for `fine_tune_epochs`; then `fold`.
- `refit_warm` / `refit_fresh`: `ls.refit` of a target run's model from the
  folded weights, or from a fresh initialisation with the full budget.
- peers, matched to `target_scratch` of the same fraction and seed
  (`tf_layersparse.experiments.peers`): `bn_scratch`, its folded
  architecture with BatchNormalization, from scratch; `data_free`, as many
  blocks collapsed but spread evenly without data, from scratch;
  `shallower`, the family's net with fewer blocks per stage at the closest
  FLOPs; `linearised`, activation linearisation (Layer Folding) removing as
  many layers; `pruned` (every-layer fraction only), the baseline pruned by
  magnitude to the folded model's parameter count and fine-tuned.

`summarise` then measures latency (`convnet_measure`, alternating in one
process) and writes `summary.json`, `table.md` and `pareto.png`. The
recommended model is the fastest target-derived model whose mean validation
accuracy over seeds is within `tolerance` of the baseline's; the test split
is read only for reporting.
"""

import dataclasses
import fnmatch
import json
import os
import platform
import subprocess
import time

import keras
import numpy as np

import tf_layersparse as ls
from tf_layersparse.experiments import convnet, peers
from tf_layersparse.experiments.peers import with_batchnorm

__all__ = [
    "StudyConfig",
    "Run",
    "plan_runs",
    "run_convnet_study",
    "split_data",
    "with_batchnorm",
    "read_runs",
]

EVERY = "every"
PEERS = ("bn_scratch", "data_free", "shallower", "linearised", "pruned")


@dataclasses.dataclass
class StudyConfig:
    """Sizes and recipe of a study; `quick()` and `tiny()` give the CLI's and the test's."""

    arch: str = "mobilenet"
    n_train: int = 55_000
    n_val: int = 5_000
    n_test: int = 10_000
    epochs: int = 15              # every model trained from scratch
    fine_tune_epochs: int = 5     # target fine-tunes of the baseline, warm refits, pruning
    fractions: tuple = (EVERY, 0.75, 0.85)
    seeds: tuple = (0, 1, 2)
    peers: tuple = PEERS
    batch_size: int = 64
    learning_rate: float = 0.05
    fine_tune_rate: float = 0.01
    strength: float = 1e-3        # only weighs layers against each other under a target
    linearise_strength: float = 1e-3
    tolerance: float = 0.005      # validation accuracy the recommended model may lose
    latency_repeats: int = 15
    tflite_threads: int = 2
    small: bool = False
    augment: bool = False         # random crops (4-pixel shifts) and flips: CIFAR-10's usual

    @classmethod
    def quick(cls, arch="mobilenet"):
        """Minutes on 2 cores; still ends with a shallower, faster model."""
        return cls(arch=arch, n_train=4000, n_val=1000, n_test=2000, epochs=3,
                   fine_tune_epochs=1, fractions=(EVERY,), seeds=(0,), latency_repeats=7)

    @classmethod
    def tiny(cls, arch="mobilenet"):
        """A small network on a few hundred images: checks the pipeline (tests)."""
        return cls(arch=arch, n_train=512, n_val=256, n_test=256, epochs=2,
                   fine_tune_epochs=1, fractions=(EVERY,), seeds=(0,), latency_repeats=3,
                   small=True)

    def recipe(self, epochs, seed, learning_rate=None):
        return convnet.TrainConfig(epochs=epochs, batch_size=self.batch_size,
                                   learning_rate=learning_rate or self.learning_rate,
                                   seed=seed, augment=self.augment)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training job of the study: `kind`, seed, FLOPs fraction and source run."""

    name: str
    kind: str
    seed: int
    fraction: object = None
    source: str = None

    @property
    def config(self):
        """The name without its seed: the model the study reports over seeds."""
        return self.name.rsplit("_s", 1)[0]


def _fraction_tag(fraction):
    return EVERY if fraction == EVERY else f"f{fraction:g}"


def plan_runs(config):
    """The study's runs in the order they run: every seed's baseline and
    every-layer runs first, then the other fractions, then the fresh refits.

    >>> runs = plan_runs(StudyConfig(fractions=("every",), seeds=(0,), peers=("shallower",)))
    >>> [r.name for r in runs]  # doctest: +NORMALIZE_WHITESPACE
    ['baseline_s0', 'target_finetune_every_s0', 'refit_warm_finetune_every_s0',
     'target_scratch_every_s0', 'refit_warm_scratch_every_s0', 'peer_shallower_every_s0',
     'refit_fresh_finetune_every_s0', 'refit_fresh_scratch_every_s0']
    """
    tiers = ([f for f in config.fractions if f == EVERY],
             [f for f in config.fractions if f != EVERY])
    ordered = []
    for tier, fractions in enumerate(tiers):
        for seed in config.seeds:
            runs = [Run(f"baseline_s{seed}", "baseline", seed)] if tier == 0 else []
            for fraction in fractions:
                tag = _fraction_tag(fraction)
                for start in ("finetune", "scratch"):
                    target = f"target_{start}_{tag}_s{seed}"
                    runs.append(Run(target, "target", seed, fraction,
                                    f"baseline_s{seed}"))
                    runs.append(Run(f"refit_warm_{start}_{tag}_s{seed}", "refit_warm", seed,
                                    fraction, target))
                for peer in config.peers:
                    if peer == "pruned" and fraction != EVERY:
                        continue
                    runs.append(Run(f"peer_{peer}_{tag}_s{seed}", peer, seed, fraction,
                                    f"target_scratch_{tag}_s{seed}"))
            ordered.extend(runs)
    for fraction in config.fractions:
        for seed in config.seeds:
            for start in ("finetune", "scratch"):
                tag = _fraction_tag(fraction)
                ordered.append(Run(f"refit_fresh_{start}_{tag}_s{seed}", "refit_fresh", seed,
                                   fraction, f"target_{start}_{tag}_s{seed}"))
    return ordered


def split_data(images, config, seed=0):
    """(x_train, y_train, x_val, y_val, x_test, y_test) as images of `images.shape`.

    Validation images are the training split's, disjoint from the training
    subset (the same for every seed: `seed` orders them); a KMNIST
    substitute (one split only) is cut into three parts.

    >>> from tf_layersparse.experiments.datasets import Images
    >>> flat = np.zeros((50, 784), "float32"); labels = np.arange(50) % 10
    >>> images = Images("toy", flat, labels, flat[:20], labels[:20], "toy")
    >>> [len(a) for a in split_data(images, StudyConfig(n_train=30, n_val=10, n_test=5))]
    [30, 30, 10, 10, 5, 5]
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images.x_train))
    x_all, y_all = images.x_train, images.y_train
    if images.x_test is None:  # KMNIST substitute: disjoint parts of its one split
        n_test = min(config.n_test, len(order) // 3)
        test, order = order[:n_test], order[n_test:]
        x_test, y_test = x_all[test], y_all[test]
    else:
        x_test, y_test = images.x_test[:config.n_test], images.y_test[:config.n_test]
    val = order[:config.n_val]
    train = order[config.n_val:config.n_val + config.n_train]
    def image(flat):
        return convnet.to_images(flat, images.shape)

    return (image(x_all[train]), y_all[train], image(x_all[val]), y_all[val],
            image(x_test), np.asarray(y_test))


def read_runs(out):
    """`{name: row}` of the finished runs in `out/runs.jsonl` (the last row wins)."""
    rows = {}
    path = os.path.join(out, "runs.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["name"]] = row
    return rows


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__),
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# the code a study process runs is the code it started with, whatever is committed later
_COMMIT = _commit()


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Study:
    """What every run of one study shares: data, config, output folder, log."""

    def __init__(self, images, config, out, log):
        self.config, self.out, self.log = config, out, log
        self.data = split_data(images, config)
        self.shape = tuple(images.shape)
        self.models = os.path.join(out, "models")
        os.makedirs(self.models, exist_ok=True)
        self.done = read_runs(out)

    def path(self, name):
        return os.path.join(self.models, f"{name}.keras")

    def build(self, seed):
        return convnet.build(self.config.arch, seed=seed, small=self.config.small,
                             input_shape=self.shape)

    def load(self, name):
        return keras.saving.load_model(self.path(name))

    def accuracy(self, model, split):
        x, y = {"val": self.data[2:4], "test": self.data[4:6]}[split]
        return convnet.accuracy(model, x, y)

    def train(self, model, run, epochs, learning_rate=None, callbacks=(), compile=True):
        x, y, x_val, y_val = self.data[:4]
        recipe = self.config.recipe(epochs, run.seed, learning_rate)
        history = convnet.train(model, x, y, recipe, callbacks=callbacks, log=self.log,
                                tag=run.name, compile=compile,
                                validation_data=(x_val, y_val))
        return [float(v) for v in history.history.get("val_accuracy", [])]

    def record(self, run, deployable, start, **extra):
        """Save the deployable model, append the run's row to runs.jsonl."""
        deployable.save(self.path(run.name))
        cost = ls.model_cost(deployable)
        row = dict(name=run.name, config=run.config, kind=run.kind, seed=run.seed,
                   fraction=run.fraction, source=run.source,
                   val_accuracy=self.accuracy(deployable, "val"),
                   test_accuracy=self.accuracy(deployable, "test"),
                   depth=int(cost.depth), params=int(cost.params), flops=int(cost.flops),
                   path=os.path.relpath(self.path(run.name), self.out),
                   seconds=round(time.perf_counter() - start, 1), commit=_COMMIT, **extra)
        with open(os.path.join(self.out, "runs.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        self.done[run.name] = row
        self.log(f"{run.name}: validation {row['val_accuracy']:.4f}, test "
                 f"{row['test_accuracy']:.4f}, {cost} ({row['seconds']:.0f} s)")
        return row


def _fold(model):
    return ls.fold(model, nonnegative_inputs=True, return_report=True)


def _baseline(study, run):
    start = time.perf_counter()
    model = study.build(run.seed)
    curve = study.train(model, run, study.config.epochs)
    model.save(study.path(f"{run.name}_trained"))
    fused, report = _fold(model)
    return study.record(run, fused, start, curve=curve,
                        fold_error=report.max_relative_error)


def _depth_target(model, fraction):
    if fraction == EVERY:
        return ls.DepthTarget(inactive=len(peers.removable_layers(model)))
    return ls.DepthTarget(flops=float(fraction))


def _target(study, run):
    start = time.perf_counter()
    config = study.config
    finetune = run.name.startswith("target_finetune")
    base = (study.load(f"{run.source}_trained") if finetune
            else study.build(run.seed))
    model = ls.apply_layer_sparsity(base, config.strength, nonnegative_inputs=True)
    callback = ls.ActiveLayers(target=_depth_target(base, run.fraction))
    curve = study.train(model, run, config.fine_tune_epochs if finetune else config.epochs,
                        config.fine_tune_rate if finetune else None, callbacks=[callback])
    model.save(study.path(f"{run.name}_penalised"))
    folded, report = _fold(model)
    progress = callback.progress
    x_test, y_test = study.data[4:6]
    training_mode = _training_mode_accuracy(model, x_test[:2000], y_test[:2000],
                                            config.batch_size)
    return study.record(run, folded, start, curve=curve, held=list(progress.held),
                        holds={k: int(v) for k, v in progress.holds.items()},
                        reached=bool(progress.reached),
                        flops_fraction=float(progress.flops_fraction),
                        training_mode_test_accuracy=training_mode,
                        fold_error=report.max_relative_error)


def _training_mode_accuracy(model, x, y, batch_size):
    """Accuracy with BatchNormalization on batch statistics, as `fit` sees it
    (it moves the moving statistics: call it last)."""
    hits = 0
    for i in range(0, len(x), batch_size):
        logits = keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=True))
        hits += int(np.sum(np.argmax(logits, -1) == y[i:i + batch_size]))
    return hits / len(x)


def _refit(study, run):
    start = time.perf_counter()
    config = study.config
    warm = run.kind == "refit_warm"
    epochs = config.fine_tune_epochs if warm else config.epochs
    recipe = config.recipe(epochs, run.seed, config.fine_tune_rate if warm else None)
    x, y, x_val, y_val = study.data[:4]
    steps = -(-len(x) // config.batch_size)
    progress = _EpochLog(study.log, run.name, epochs)
    refitted, history = ls.refit(
        study.load(f"{run.source}_penalised"), x, y, nonnegative_inputs=True,
        warm_start=warm, seed=run.seed + 200, optimizer=recipe.optimizer(steps),
        loss=_loss(), metrics=["accuracy"], epochs=epochs, batch_size=config.batch_size,
        validation_data=(x_val, y_val), verbose=0, callbacks=[progress])
    fused, _ = _fold(refitted)
    return study.record(run, fused, start,
                        curve=[float(v) for v in history.history["val_accuracy"]])


def _from_scratch(study, run, model, **extra):
    start = time.perf_counter()
    curve = study.train(model, run, study.config.epochs)
    fused, _ = _fold(model)
    return study.record(run, fused, start, curve=curve, **extra)


def _peer(study, run):
    config, target = study.config, study.done[run.source]
    seed = run.seed + 300
    if run.kind == "bn_scratch":
        return _from_scratch(study, run, with_batchnorm(study.load(run.source), seed=seed))
    arch = study.build(seed)
    if run.kind == "data_free":
        blocks = len(peers.collapsed_blocks(peers.removable_layers(arch), target["held"]))
        return _from_scratch(study, run, peers.data_free_collapse(arch, blocks, seed=seed),
                             blocks=blocks)
    if run.kind == "shallower":
        blocks, model = peers.shallower_net(target["flops"], config.arch, config.small, seed,
                                            study.shape)
        return _from_scratch(study, run, model, blocks=list(blocks))
    if run.kind == "linearised":
        return _linearised(study, run, arch, len(target["held"]))
    if run.kind == "pruned":
        return _pruned(study, run, target["params"])
    raise ValueError(f"unknown peer {run.kind!r}")


def _linearised(study, run, arch, count):
    # the slopes are pulled for the first half of the budget; then the `count`
    # closest to the identity become identities, the rest ReLUs, for the second
    start = time.perf_counter()
    config = study.config
    model, units = peers.linearisable(arch, config.linearise_strength)
    first = max(1, config.epochs // 2)
    curve = study.train(model, run, first)
    slopes = {u: float(keras.ops.convert_to_numpy(model.get_layer(u).slope)[0]) for u in units}
    plain, chosen = peers.linearise(model, units, count)
    rest = max(1, config.epochs - first)
    # the second half continues at the rate the first half's cosine decay had reached
    rate = config.learning_rate * 0.5 * (1 + np.cos(np.pi * first / config.epochs))
    curve += study.train(plain, run, rest, learning_rate=max(rate, 1e-4))
    fused, report = _fold(plain)
    return study.record(run, fused, start, curve=curve, slopes=slopes, linearised=chosen,
                        fold_error=report.max_relative_error)


def _pruned(study, run, target_params):
    start = time.perf_counter()
    baseline = study.load(f"baseline_s{run.seed}_trained")
    fused = ls.fold(baseline, nonnegative_inputs=True)
    fixed = ls.model_cost(fused).params - convnet.kernel_size(baseline)  # biases once fused
    keep = max(0, target_params - fixed)
    masks = convnet.magnitude_prune(baseline, keep)
    curve = study.train(baseline, run, study.config.fine_tune_epochs,
                        study.config.fine_tune_rate, callbacks=[convnet.PruneMasks(masks)])
    pruned = ls.fold(baseline, nonnegative_inputs=True)
    # zeros in dense kernels are no faster in Keras or LiteRT: count only the non-zeros
    return study.record(run, pruned, start, curve=curve,
                        nonzero_params=convnet.nonzero_params(pruned))


class _EpochLog(keras.callbacks.Callback):
    def __init__(self, log, tag, epochs):
        super().__init__()
        self.log, self.tag, self.epochs, self.start = log, tag, epochs, time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items())
        self.log(f"  {self.tag} epoch {epoch + 1}/{self.epochs}: {shown} "
                 f"({time.perf_counter() - self.start:.0f} s)")


_RUNNERS = {"baseline": _baseline, "target": _target, "refit_warm": _refit,
            "refit_fresh": _refit}


def run_convnet_study(images, config, out, log=print, only=None, report=True):
    """Run every run of `plan_runs(config)` not yet in `out/runs.jsonl` (those
    matching the glob `only`, if given), then `summarise` unless `report` is False.

    Returns the summary dict (or the rows, without the report).
    """
    from tf_layersparse.experiments import convnet_summary

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(dataclasses.asdict(config), dataset=images.name, source=images.source,
                       machine=f"{platform.platform()}, {os.cpu_count()} CPU cores"),
                  f, indent=1)
    study = _Study(images, config, out, log)
    x, _, x_val, _, x_test, _ = study.data
    log(f"{images.name} ({images.source}): {len(x)} training, {len(x_val)} validation, "
        f"{len(x_test)} test images; {config.arch}")
    runs = [r for r in plan_runs(config) if only is None or fnmatch.fnmatch(r.name, only)]
    todo = [r for r in runs if r.name not in study.done]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already done")
    for i, run in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {run.name} ({time.perf_counter() - start:.0f} s elapsed)")
        _RUNNERS.get(run.kind, _peer)(study, run)
    if not report:
        return study.done
    return convnet_summary.summarise(out, config, study.data, dataset=images.name, log=log)
