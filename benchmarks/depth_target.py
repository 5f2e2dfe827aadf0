"""Depth on demand: train to a number of inactive layers, fold, refit (with and without a teacher).

    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/depth_target.py mlp \\
        --optimizers sgd adam --targets 3 5 7 --seeds 0 1 2 --out docs/results/depth_target/mlp
    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/depth_target.py blocks \\
        --targets 1 2 3 --seeds 0 1 2 --out docs/results/depth_target/blocks
    python benchmarks/depth_target.py mlp --quick       # random data, tiny, seconds

Studies:

- `mlp`: the paper's MNIST network, 784 -> 10 hidden ReLU layers of width
  50 -> 10 logits, all 60,000 training images, the 10,000 test images,
  batch 100, 20 epochs; hidden layers 2-10 penalised (9, kernel and bias
  in one norm). SGD 0.05 or Adam 1e-3 (constant rates).
- `blocks`: 4 Conv2D(3x3, 'valid', no bias) -> BatchNormalization -> ReLU
  blocks -> GAP -> Dense(10) on Fashion-MNIST (3,000 training / 1,000 test
  images), SGD 0.05 cosine-decayed, batch 64, 6 epochs with the target then
  4 epochs of refit from the folded weights; the baseline trains 10.

Per optimizer and seed, the unpenalised baseline trains first (same
initial weights and batches as every other run of that seed). Per target,
the penalised net trains with `ActiveLayers(target=DepthTarget(inactive=t))`
(starting strength 1e-3, multiplied up by the target's continuation), then
is folded (`fold`, default cost policy; error measured on the test images)
and refitted without the penalty for the same budget: fresh
initialisation for `mlp` (the paper's refit), warm start for `blocks`
(as in the fixed-strength block study), once plain and once distilling
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

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("mlp", "blocks"))
    parser.add_argument("--optimizers", nargs="+", choices=("sgd", "adam"), default=["sgd"])
    parser.add_argument("--targets", nargs="+", type=int, default=None,
                        help="inactive layers to ask for (mlp: 3 5 7, blocks: 1 2 3)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs with the target (mlp 20, blocks 6)")
    parser.add_argument("--refit-epochs", type=int, default=None, help="(mlp 20, blocks 4)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--no-teacher", action="store_true", help="skip the distilled refits")
    parser.add_argument("--pull", choices=("all", "focused"), default="all",
                        help="DepthTarget's pull (which layers the penalty acts on)")
    parser.add_argument("--end-fraction", type=float, default=None,
                        help="DepthTarget's end step as a fraction of the penalised fit's "
                             "steps (default: the target's own, three quarters)")
    parser.add_argument("--out", default=None, help="folder for runs.jsonl (default: none)")
    parser.add_argument("--quick", action="store_true", help="random data, tiny sizes")
    args = parser.parse_args(argv)
    mlp = args.study == "mlp"
    args.targets = args.targets or ([3, 5, 7] if mlp else [1, 2, 3])
    args.epochs = args.epochs or (20 if mlp else 6)
    args.refit_epochs = args.refit_epochs if args.refit_epochs is not None else (
        20 if mlp else 4)
    args.n_train = args.n_train or (60_000 if mlp else 3000)
    if not mlp:
        args.n_test = min(args.n_test, 1000)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.refit_epochs = 400, 100, 2, 1
        args.targets = [2] if mlp else [1]
    return args


class Study:
    """Data, model and training recipe of one study."""

    def __init__(self, args, seed):
        self.args, self.seed = args, seed
        self.mlp = args.study == "mlp"
        load = mnist_subset if self.mlp else fashion_subset
        *self.data, self.source = load(args.n_train, args.n_test, seed, args.quick)
        self.batch_size = 100 if self.mlp else 64
        self.base = paper_mlp(seed=seed) if self.mlp else conv_bn_net(seed)

    def optimizer(self, name, epochs):
        if self.mlp:
            return make_optimizer(name)
        return block_optimizer(name, _steps(len(self.data[0]), epochs, self.batch_size))

    def penalised(self):
        if self.mlp:  # hidden layers 2-10, as the paper (the first reads pixels)
            return ls.apply_layer_sparsity(self.base, 1e-3, group="layer")
        return ls.apply_layer_sparsity(self.base, 1e-3, nonnegative_inputs=True)

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


def _baseline(study, optimizer):
    args = study.args
    model = keras.models.clone_model(study.base)
    model.set_weights(study.base.get_weights())
    start = time.perf_counter()
    # the baseline gets the whole budget of a penalised run: refits are
    # extra for the mlp (a fresh start) and a continuation for the blocks
    epochs = args.epochs if study.mlp else args.epochs + args.refit_epochs
    study.fit(model, optimizer, epochs)
    row = dict(kind="baseline", accuracy=study.accuracy(model), epochs=epochs,
               seconds=time.perf_counter() - start)
    return row, model


def _target_run(study, optimizer, target, teacher):
    args = study.args
    model = study.penalised()
    end = None
    if args.end_fraction is not None:
        steps = -(-len(study.data[0]) // study.batch_size) * args.epochs
        end = max(1, round(args.end_fraction * steps))
    callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=target, pull=args.pull,
                                                     end_step=end),
                               nonnegative_inputs=not study.mlp)
    start = time.perf_counter()
    history = study.fit(model, optimizer, args.epochs, [callback])
    seconds = time.perf_counter() - start
    progress = callback.progress
    penalised = len(ls.regularized_layers(model))
    row = dict(kind="target", target=target, pull=args.pull, end_step=end,
               held=progress.inactive,
               inactive=penalised - history.history["active_layers"][-1],
               penalised=penalised, multiplier=progress.multiplier,
               accuracy=study.accuracy(model), seconds=seconds)
    folded, report = ls.fold(model, nonnegative_inputs=not study.mlp, return_report=True)
    errors = ls.compare_outputs(model, folded, study.data[2][:2000])
    row.update(depth_before=ls.model_cost(model).depth, depth_after=ls.model_cost(folded).depth,
               flops_fraction=ls.model_cost(folded).flops / ls.model_cost(model).flops,
               fold_error=max(rel for _, rel in errors.values()),
               folded_accuracy=study.accuracy(folded))
    for name, with_teacher in (("refit", None), ("refit_teacher", teacher)):
        if name == "refit_teacher" and (args.no_teacher or teacher is None):
            continue
        keras.utils.set_random_seed(study.seed)
        refitted, _ = ls.refit(
            model, study.data[0], study.data[1], nonnegative_inputs=not study.mlp,
            warm_start=not study.mlp, seed=study.seed,
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
    return (row["optimizer"], row["seed"], row["kind"], row.get("target"),
            row.get("pull", "all") if row["kind"] == "target" else None)


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def table(rows):
    """Mean ± sample standard deviation over seeds, one line per setting."""
    lines = ["| optimizer | run | seeds | inactive (held) / penalised | Dense/conv layers "
             "after fold | FLOPs kept | fold max rel. error | test acc. (%) | after fold (%) "
             "| refit (%) | refit + teacher (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def setting(r):
        return (r["optimizer"], r["kind"], r.get("target") or 0, r.get("pull", "all"))

    for optimizer, kind, target, pull in sorted({setting(r) for r in rows}):
        group = [r for r in rows if setting(r) == (optimizer, kind, target, pull)]
        seeds = ",".join(str(r["seed"]) for r in group)
        if kind == "baseline":
            lines.append(f"| {optimizer} | no penalty | {seeds} | - | - | - | - | "
                         f"{_mean_sd([r['accuracy'] for r in group])} | - | - | - |")
            continue
        inactive = "; ".join(f"{r['inactive']} ({r['held']}) / {r['penalised']}" for r in group)
        depth = "; ".join(f"{r['depth_before']} -> {r['depth_after']}" for r in group)
        flops = _mean_sd([100 * r["flops_fraction"] for r in group])
        error = max(r["fold_error"] for r in group)
        lines.append(
            f"| {optimizer} | target {target}{' (focused)' if pull == 'focused' else ''} | "
            f"{seeds} | {inactive} | {depth} | {flops}% | "
            f"{error:.1e} | {_mean_sd([r['accuracy'] for r in group])} | "
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
            todo = [("baseline", None)] + [("target", t) for t in args.targets]
            for kind, target in todo:
                pull = args.pull if kind == "target" else None
                if (optimizer, seed, kind, target, pull) in done and (
                        kind != "baseline" or all((optimizer, seed, "target", t, args.pull)
                                                  in done for t in args.targets)):
                    continue
                if kind == "baseline":
                    row, baseline = _baseline(study, optimizer)
                    if (optimizer, seed, kind, None, None) in done:
                        row = None  # trained again only to teach
                else:
                    row = _target_run(study, optimizer, target, baseline)
                if row is None:
                    continue
                row.update(optimizer=optimizer, seed=seed)
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
