"""Depth on demand: train to a number of inactive layers, fold, refit (with and without a teacher).

    # the starting-strength sweep: every optimizer, strengths 1e-4..1e-1 and none, 3 seeds
    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/depth_target.py mlp \\
        --length short --optimizers sgd adam adamw --strengths 0 1e-4 1e-3 1e-2 1e-1 \\
        --targets 5 --seeds 0 1 2 --no-refit --out docs/results/depth_target/sweep_short
    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/depth_target.py blocks \\
        --targets 1 2 3 --seeds 0 1 2 --out docs/results/depth_target/blocks
    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/depth_target.py mobilenet \\
        --seeds 0 1 2 --out docs/results/depth_target/mobilenet       # every block
    python benchmarks/depth_target.py mlp --quick       # random data, tiny, seconds

Studies:

- `mlp`: the paper's MNIST network, 784 -> 10 hidden ReLU layers of width
  50 -> 10 logits, batch 100; hidden layers 2-10 penalised (9, kernel and
  bias in one norm). `--length short`: 10,000 training images, 12 epochs;
  `long` (default): all 60,000, 20 epochs; the 10,000 test images. SGD
  0.05 (`sgd`), SGD 0.01 with momentum 0.9 (`sgdm`), Adam 1e-3 or AdamW
  1e-3 (weight decay 1e-4), constant rates.
- `blocks`: 4 Conv2D(3x3, 'valid', no bias) -> BatchNormalization -> ReLU
  blocks -> GAP -> Dense(10) on Fashion-MNIST (3,000 training / 1,000 test
  images), SGD 0.05 cosine-decayed, batch 64, 6 epochs with the target then
  4 epochs of refit from the folded weights; the baseline trains 10.
- `mobilenet`: the convnet study's MobileNet-style net
  (`experiments.convnet.build("mobilenet")`) on Fashion-MNIST (20,000
  training / 10,000 test images), the study's recipe (SGD 0.05 with
  momentum 0.9, cosine-decayed, batch 64, 4 epochs; `adam`: Adam 1e-3,
  cosine-decayed), asked for every removable block (`--targets` is
  ignored), refit 4 epochs from a fresh start. At every epoch end the
  penalised net's accuracy on the first 2,000 test images is measured in
  inference mode (moving statistics) and in training mode (batch
  statistics of batches of 64, moving statistics left as they were).

Per optimizer and seed, the unpenalised baseline trains first (same
initial weights and batches as every other run of that seed). Per target
and starting strength (`--strengths`, the regularizers' strength; 0: none),
the penalised net trains with `ActiveLayers(target=DepthTarget(...))` and
its default schedule. Each run reports the test accuracy of the penalised
net at the end of the epoch in which the target was met and at the end,
the step of each hold, whether the target was met by its end step, the
lowest training accuracy of an epoch after the penalty began and the
largest drop of training accuracy from one epoch to the next (after the
first). Then it is folded (`fold`, default cost policy; error measured on
the test images) and, unless `--no-refit`, refitted without the penalty
for the same budget: fresh initialisation for `mlp` and `mobilenet` (the
paper's refit), warm start for `blocks`, once plain and once distilling
from the baseline (`refit(teacher=baseline)`, weight 0.5, temperature 4).

Each finished run appends one JSON line to `<out>/runs.jsonl`, and runs
already there are skipped, so a study can be split over several calls.
The summary table (mean and sample standard deviation over seeds) is
printed from every line in the file.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from adam_vs_sgd import make_optimizer, mnist_subset, paper_mlp  # noqa: E402
from block_formulations import _optimizer as block_optimizer  # noqa: E402
from block_formulations import _steps, conv_bn_net, fashion_subset  # noqa: E402
from tf_layersparse.experiments import convnet  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LENGTHS = {"short": (10_000, 12), "long": (60_000, 20)}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("mlp", "blocks", "mobilenet"))
    parser.add_argument("--optimizers", nargs="+", choices=("sgd", "sgdm", "adam", "adamw"),
                        default=["sgd"])
    parser.add_argument("--targets", nargs="+", type=int, default=None,
                        help="inactive layers to ask for (mlp: 3 5 7, blocks: 1 2 3)")
    parser.add_argument("--strengths", nargs="+", type=float, default=[1e-3],
                        help="the regularizers' starting strengths (0: none)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--length", choices=sorted(LENGTHS), default="long",
                        help="mlp: short = 10,000 images x 12 epochs, long = 60,000 x 20")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs with the target (mlp: from --length, blocks 6, "
                             "mobilenet 4)")
    parser.add_argument("--refit-epochs", type=int, default=None,
                        help="(mlp: as --epochs, blocks 4, mobilenet 4)")
    parser.add_argument("--no-refit", action="store_true", help="skip the refits")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--no-teacher", action="store_true", help="skip the distilled refits")
    parser.add_argument("--pull", choices=("focused", "all"), default="focused",
                        help="DepthTarget's pull (which layers the penalty acts on)")
    parser.add_argument("--end-fraction", type=float, default=None,
                        help="DepthTarget's end step as a fraction of the penalised fit's "
                             "steps (default: the target's own, one half)")
    parser.add_argument("--warm-up", choices=("default", "takeoff", "tenth"), default="default",
                        help="the target's warm-up: its default, waiting for training to take "
                             "off, or a tenth of the steps")
    parser.add_argument("--out", default=None, help="folder for runs.jsonl (default: none)")
    parser.add_argument("--quick", action="store_true", help="random data, tiny sizes")
    args = parser.parse_args(argv)
    n_train, epochs = {"mlp": LENGTHS[args.length], "blocks": (3000, 6),
                       "mobilenet": (20_000, 4)}[args.study]
    args.targets = args.targets or {"mlp": [3, 5, 7], "blocks": [1, 2, 3],
                                    "mobilenet": [0]}[args.study]
    if args.study == "mobilenet":
        args.targets = [-1]  # every removable block
    args.epochs = args.epochs or epochs
    if args.refit_epochs is None:
        args.refit_epochs = args.epochs if args.study == "mlp" else 4
    args.n_train = args.n_train or n_train
    if args.study == "blocks":
        args.n_test = min(args.n_test, 1000)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.refit_epochs = 400, 100, 2, 1
        args.targets = {"mlp": [2], "blocks": [1], "mobilenet": [-1]}[args.study]
    return args


class Study:
    """Data, model and training recipe of one study."""

    def __init__(self, args, seed):
        self.args, self.seed, self.kind = args, seed, args.study
        load = mnist_subset if self.kind == "mlp" else fashion_subset
        *self.data, self.source = load(args.n_train, args.n_test, seed, args.quick)
        self.batch_size = 100 if self.kind == "mlp" else 64
        self.nonnegative_inputs = self.kind != "mlp"
        if self.kind == "mlp":
            self.base = paper_mlp(seed=seed)
        elif self.kind == "blocks":
            self.base = conv_bn_net(seed)
        else:
            self.base = convnet.build("mobilenet", seed=seed, small=args.quick)

    def optimizer(self, name, epochs):
        if self.kind == "mlp":
            return make_optimizer(name)
        steps = _steps(len(self.data[0]), epochs, self.batch_size)
        if self.kind == "blocks":
            return block_optimizer(name, steps)
        if name == "adam":
            return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps))
        config = convnet.TrainConfig(epochs=epochs, batch_size=self.batch_size)
        return config.optimizer(steps // epochs)

    def penalised(self, strength):
        if self.kind == "mlp":  # hidden layers 2-10, as the paper (the first reads pixels)
            return ls.apply_layer_sparsity(self.base, strength, group="layer")
        return ls.apply_layer_sparsity(self.base, strength, nonnegative_inputs=True)

    def target(self, count, model):
        end = None
        if self.args.end_fraction is not None:
            steps = _steps(len(self.data[0]), self.args.epochs, self.batch_size)
            end = max(1, round(self.args.end_fraction * steps))
        options = dict(pull=self.args.pull, end_step=end)
        if self.args.warm_up != "default":
            options["wait_for_takeoff"] = self.args.warm_up == "takeoff"
        if count < 0:
            names = list(ls.negative_part_norms(model))  # depthwise layers included
            count = len(ls.targets.removal_savings(model, names, self.nonnegative_inputs)[0])
        return ls.DepthTarget(inactive=count, **options)

    def fit(self, model, optimizer, epochs, callbacks=()):
        model.compile(self.optimizer(optimizer, epochs), LOSS, metrics=["accuracy"])
        keras.utils.set_random_seed(self.seed)  # same batches for every run
        x, y = self.data[0], self.data[1]
        return model.fit(x, y, batch_size=self.batch_size, epochs=epochs, verbose=0,
                         callbacks=list(callbacks))

    def accuracy(self, model):
        if not getattr(model, "compiled", False):
            model.compile("sgd", LOSS, metrics=["accuracy"])
        return 100 * model.evaluate(self.data[2], self.data[3], batch_size=1000,
                                    verbose=0)[1]


class _WhenReached(keras.callbacks.Callback):
    """Test accuracy at the end of the epoch in which the target was met."""

    def __init__(self, study, steering):
        super().__init__()
        self.study, self.steering = study, steering
        self.accuracy = self.epoch = None

    def on_epoch_end(self, epoch, logs=None):
        progress = self.steering.progress
        if self.accuracy is None and progress is not None and progress.reached:
            self.accuracy, self.epoch = self.study.accuracy(self.model), epoch


class _ModeAccuracy(keras.callbacks.Callback):
    """Test accuracy at every epoch end in inference mode and in training
    mode (BatchNormalization on batch statistics, moving statistics
    restored afterwards), in points, on the first `n` test images."""

    def __init__(self, study, n=2000, batch_size=64):
        super().__init__()
        self.x, self.y = study.data[2][:n], study.data[3][:n]
        self.batch_size = batch_size
        self.inference, self.training = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.inference.append(_accuracy(self.model, self.x, self.y, self.batch_size, False))
        self.training.append(_accuracy(self.model, self.x, self.y, self.batch_size, True))


def _accuracy(model, x, y, batch_size, training):
    moving = [v for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization)
              for v in (layer.moving_mean, layer.moving_variance)]
    kept = [keras.ops.convert_to_numpy(v) for v in moving]
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=training))
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[start:start + batch_size]))
    for variable, value in zip(moving, kept):
        variable.assign(value)
    return 100 * correct / len(x)


def _training_course(history, begin_epoch):
    """(lowest training accuracy from `begin_epoch` on, largest drop from
    one epoch to the next after the first), in points."""
    accuracy = [100 * a for a in history.history["accuracy"]]
    lowest = min(accuracy[begin_epoch:]) if accuracy[begin_epoch:] else None
    drops = [accuracy[e - 1] - accuracy[e] for e in range(2, len(accuracy))]
    return lowest, max(drops, default=0.0)


def _baseline(study, optimizer):
    args = study.args
    model = keras.models.clone_model(study.base)
    model.set_weights(study.base.get_weights())
    start = time.perf_counter()
    # the baseline gets the whole budget of a penalised run: refits are
    # extra for a fresh start and a continuation for the blocks
    epochs = args.epochs + (args.refit_epochs if study.kind == "blocks" else 0)
    history = study.fit(model, optimizer, epochs)
    row = dict(kind="baseline", accuracy=study.accuracy(model), epochs=epochs,
               train_accuracy=[100 * a for a in history.history["accuracy"]],
               seconds=time.perf_counter() - start)
    return row, model


def _target_run(study, optimizer, target, strength, teacher):
    args = study.args
    model = study.penalised(strength)
    depth_target = study.target(target, model)
    callback = ls.ActiveLayers(target=depth_target,
                               nonnegative_inputs=study.nonnegative_inputs)
    reached = _WhenReached(study, callback)
    modes = [] if study.kind == "mlp" else [_ModeAccuracy(study)]
    start = time.perf_counter()
    history = study.fit(model, optimizer, args.epochs, [callback, reached, *modes])
    seconds = time.perf_counter() - start
    progress = callback.progress
    steps_per_epoch = _steps(len(study.data[0]), 1, study.batch_size)
    begin, end = depth_target.schedule(steps_per_epoch * args.epochs)
    lowest, drop = _training_course(history, (progress.begin_step or begin) // steps_per_epoch)
    penalised = len(callback.norms)
    row = dict(kind="target", target=depth_target.inactive, strength=strength,
               pull=args.pull, wait_for_takeoff=depth_target.wait_for_takeoff,
               begin_step=progress.begin_step, latest_begin_step=begin,
               end_step=end, held=progress.inactive,
               reached=progress.reached, holds=progress.holds,
               reached_by_end=progress.reached and max(progress.holds.values(), default=0)
               <= end,
               inactive=penalised - history.history["active_layers"][-1],
               penalised=penalised, multiplier=progress.multiplier,
               accuracy_at_target=reached.accuracy, epoch_at_target=reached.epoch,
               accuracy=study.accuracy(model), lowest_train_accuracy=lowest,
               largest_drop=drop,
               train_accuracy=[100 * a for a in history.history["accuracy"]],
               guard=history.history.get("pull_guard"), seconds=seconds)
    if modes:
        row.update(inference_accuracy=modes[0].inference, training_mode_accuracy=modes[0].training)
    folded, report = ls.fold(model, nonnegative_inputs=study.nonnegative_inputs,
                             return_report=True)
    errors = ls.compare_outputs(model, folded, study.data[2][:2000])
    row.update(depth_before=ls.model_cost(model).depth, depth_after=ls.model_cost(folded).depth,
               flops_fraction=ls.model_cost(folded).flops / ls.model_cost(model).flops,
               fold_error=max(rel for _, rel in errors.values()),
               folded_accuracy=study.accuracy(folded))
    if args.no_refit:
        return row
    for name, with_teacher in (("refit", None), ("refit_teacher", teacher)):
        if name == "refit_teacher" and (args.no_teacher or teacher is None):
            continue
        keras.utils.set_random_seed(study.seed)
        refitted, _ = ls.refit(
            model, study.data[0], study.data[1], nonnegative_inputs=study.nonnegative_inputs,
            warm_start=study.kind == "blocks", seed=study.seed,
            optimizer=study.optimizer(optimizer, args.refit_epochs), loss=LOSS,
            metrics=["accuracy"], teacher=with_teacher, batch_size=study.batch_size,
            epochs=args.refit_epochs, verbose=0)
        row[f"{name}_accuracy"] = study.accuracy(refitted)
    return row


def _done(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _key(row):
    target = row["kind"] == "target"
    asked = row.get("asked", row.get("target"))
    return (row["optimizer"], row["seed"], row["kind"], asked if target else None,
            row.get("pull", "all") if target else None,
            row.get("strength", 1e-3) if target else None)


def _mean_sd(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(rows):
    """Mean ± sample standard deviation over seeds, one line per setting."""
    lines = ["| optimizer | run | strength | seeds | met by end step | inactive (held) / "
             "penalised | hold steps | Dense/conv layers after fold | FLOPs kept | fold max "
             "rel. error | test acc. at target (%) | test acc. (%) | lowest train acc. after "
             "begin (%) | largest epoch drop (points) | after fold (%) | refit (%) | "
             "refit + teacher (%) |",
             "|" + "---|" * 17]

    def setting(r):
        target = r["kind"] == "target"
        return (r["optimizer"], r["kind"], r.get("asked", r.get("target")) or 0,
                r.get("pull", "all") if target else "",
                r.get("strength", 1e-3) if target else -1.0)

    for optimizer, kind, target, pull, strength in sorted({setting(r) for r in rows}):
        group = [r for r in rows if setting(r) == (optimizer, kind, target, pull, strength)]
        seeds = ",".join(str(r["seed"]) for r in group)
        if kind == "baseline":
            lowest = [min(r["train_accuracy"][1:] or r["train_accuracy"])
                      for r in group if r.get("train_accuracy")]
            lines.append(f"| {optimizer} | no penalty | - | {seeds} | - | - | - | - | - | - | "
                         f"- | {_mean_sd([r['accuracy'] for r in group])} | "
                         f"{_mean_sd(lowest)} | - | - | - | - |")
            continue
        met = sum(bool(r.get("reached_by_end", r.get("held") == r.get("target")))
                  for r in group)
        inactive = "; ".join(f"{r['inactive']} ({r['held']}) / {r['penalised']}" for r in group)
        holds = "; ".join(",".join(str(s) for s in sorted(r.get("holds", {}).values()))
                          for r in group)
        depth = "; ".join(f"{r['depth_before']} -> {r['depth_after']}" for r in group)
        flops = _mean_sd([100 * r["flops_fraction"] for r in group])
        error = max(r["fold_error"] for r in group)
        strength_text = "none" if strength == 0 else f"{strength:g}"
        lines.append(
            f"| {optimizer} | target {'every block' if target < 0 else target}"
            f"{' (all)' if pull == 'all' else ''} | "
            f"{strength_text} | {seeds} | {met} of {len(group)} | {inactive} | {holds} | "
            f"{depth} | {flops}% | {error:.1e} | "
            f"{_mean_sd([r.get('accuracy_at_target') for r in group])} | "
            f"{_mean_sd([r['accuracy'] for r in group])} | "
            f"{_mean_sd([r.get('lowest_train_accuracy') for r in group])} | "
            f"{_mean_sd([r.get('largest_drop') for r in group])} | "
            f"{_mean_sd([r['folded_accuracy'] for r in group])} | "
            f"{_mean_sd([r.get('refit_accuracy') for r in group])} | "
            f"{_mean_sd([r.get('refit_teacher_accuracy') for r in group])} |")
    return "\n".join(lines)


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    path = os.path.join(args.out, "runs.jsonl") if args.out else None
    if path:
        os.makedirs(args.out, exist_ok=True)
    rows = _done(path)
    done = {_key(r) for r in rows}
    start = time.perf_counter()
    for seed in args.seeds:
        study = Study(args, seed)
        print(f"# {args.study}, seed {seed}, backend {keras.backend.backend()}; data: "
              f"{study.source}; {args.n_train} training / {args.n_test} test images; "
              f"{args.epochs} epochs with the target, {args.refit_epochs} of refit",
              flush=True)
        for optimizer in args.optimizers:
            baseline = None
            todo = [(t, s) for t in args.targets for s in args.strengths
                    if (optimizer, seed, "target", t, args.pull, s) not in done]
            wanted = (optimizer, seed, "baseline", None, None, None)
            need_teacher = todo and not args.no_refit and not args.no_teacher
            if wanted not in done or need_teacher:
                row, baseline = _baseline(study, optimizer)
                if wanted not in done:
                    row.update(optimizer=optimizer, seed=seed)
                    rows.append(row)
                    print("# " + json.dumps(row), flush=True)
                    if path:
                        with open(path, "a") as f:
                            f.write(json.dumps(row) + "\n")
            for target, strength in todo:
                row = _target_run(study, optimizer, target, strength, baseline)
                # `asked` (-1: every removable block) is what a later call resumes by
                row.update(optimizer=optimizer, seed=seed, asked=target)
                rows.append(row)
                print("# " + json.dumps(row), flush=True)
                if path:
                    with open(path, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(rows))
    print(f"# this call {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
