"""Two proximal steps for Conv -> BatchNormalization -> ReLU blocks, compared (issue 11).

    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/block_formulations.py
    KERAS_BACKEND=jax python benchmarks/block_formulations.py      # or --backend jax
    python benchmarks/block_formulations.py --quick                # random data, seconds

A block `Conv2D(use_bias=False) -> BatchNormalization -> ReLU` is inactive
when its effective (BN-folded) kernel `K * s` and bias `beta - s * mean`,
`s = gamma / sqrt(var + eps)` under the moving statistics, have no negative
entry; then its ReLU is the identity on its non-negative input and `fold`
merges it into the next layer. `apply_layer_sparsity(...,
block_step=...)` offers two proximal steps towards that (see
`tf_layersparse.proximal`):

- `"effective"`: the proximal step on `(K_eff, b_eff)` in effective
  coordinates, mapped back to `K` and `beta`; `gamma` is free.
- `"raw"`: `gamma` is projected to >= 0 and the proximal step acts on
  `(K, b_eff)`.

The net: 4 such blocks (3x3 kernels, 'valid' padding so that merged
convolutions are exact, 16, 16, 32, 32 filters, stride 2 in blocks 2 and 4,
BatchNormalization momentum 0.9) -> GlobalAveragePooling -> Dense(10), on
28 x 28 Fashion-MNIST (pixels in [0, 1], so `nonnegative_inputs=True` and
all 4 blocks are penalised). The baseline (no penalty) and both steps at
each strength start from the same weights and see the same batches. Printed per run: test accuracy,
inactive blocks (exactly, under the moving statistics: `ActiveLayers`
with tolerance 0), convolutions after `ls.fold(policy="depth")` (every
exact merge), and the fold's max relative output error on the test images
(measured here with `compare_outputs`; the issue asks for <= 1e-5). With
`--refit-epochs N`, each penalised net is then folded and trained on
without the penalty from its folded weights (`ls.refit(warm_start=True)`)
for N epochs, and the baseline trains for `epochs + N` epochs.
"""

import argparse
import os
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="sets KERAS_BACKEND (default: the environment's)")
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.1, 0.5, 2.0])
    parser.add_argument("--steps", nargs="+", choices=("effective", "raw"),
                        default=["effective", "raw"])
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit-epochs", type=int, default=0,
                        help="also fold and retrain each penalised net without the "
                             "penalty (warm start) for this many epochs")
    parser.add_argument("--quick", action="store_true", help="random data, tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.strengths = 256, 64, 1, [0.3]
        args.refit_epochs = min(args.refit_epochs, 1)
    return args


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend:
    os.environ["KERAS_BACKEND"] = ARGS.backend  # before keras is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("KERAS_BACKEND") == "torch":
    import torch

    # torch's default thread pool spins on a loaded 2-core machine (~8x slower)
    torch.set_num_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments.datasets import load_images  # noqa: E402

FILTERS = (16, 16, 32, 32)
# Keras' default 0.99 leaves the moving statistics (which inference, the
# inactivity test and fold use) far from the batch statistics after the few
# hundred steps of this benchmark: the unpenalised net then tested at chance
BN_MOMENTUM = 0.9


def conv_bn_net(seed=0):
    """4 Conv(valid, no bias) -> BN -> ReLU blocks, GAP, Dense(10) logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for i, filters in enumerate(FILTERS):
        h = keras.layers.Conv2D(filters, 3, strides=2 if i % 2 else 1, use_bias=False,
                                name=f"conv{i + 1}")(h)
        h = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i + 1}")(h)
        h = keras.layers.ReLU(name=f"relu{i + 1}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="conv_bn")


def fashion_subset(n_train, n_test, seed, quick):
    """Images shaped (n, 28, 28, 1) in [0, 1]; random pixels with --quick."""
    rng = np.random.default_rng(seed)
    if quick:
        x = rng.uniform(size=(n_train + n_test, 28, 28, 1)).astype("float32")
        y = rng.integers(0, 10, size=n_train + n_test).astype("int32")
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:], "random (--quick)"
    images = load_images("fashion_mnist")
    train = rng.permutation(len(images.x_train))[:n_train]
    shape = (-1, 28, 28, 1)
    return (images.x_train[train].reshape(shape), images.y_train[train],
            images.x_test[:n_test].reshape(shape), images.y_test[:n_test], images.source)


def _optimizer(name, steps):
    """SGD 0.05 or Adam 1e-3, cosine-decayed to 0 over `steps` steps.

    The decay matters for blocks: with a constant rate the proximal step and
    the gradient keep moving a block's kernel every step, the moving
    statistics (used at inference, and by the inactivity test) lag behind
    the batch statistics, and a penalised net that trains to 54% tested at
    12% (TensorFlow, s = 1, 4 epochs); decayed, the two agree within 1%.
    """
    rate = 0.05 if name == "sgd" else 1e-3
    schedule = keras.optimizers.schedules.CosineDecay(rate, max(steps, 1))
    return keras.optimizers.SGD(schedule) if name == "sgd" else \
        keras.optimizers.Adam(schedule)


def _steps(n, epochs, batch_size=64):
    return -(-n // batch_size) * epochs


def _convs(model):
    return sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
               for layer in model.layers)


def run_one(base, step, strength, data, args):
    """Train a copy of `base` (no penalty when `step` is None); one row."""
    x_train, y_train, x_test, y_test = data
    if step is None:
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
    else:
        model = ls.apply_layer_sparsity(base, strength, nonnegative_inputs=True,
                                        block_step=step)
    # with --refit-epochs the baseline gets as many epochs as penalty + refit
    epochs = args.epochs + (args.refit_epochs if step is None else 0)
    model.compile(_optimizer(args.optimizer, _steps(len(x_train), epochs)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    keras.utils.set_random_seed(args.seed)  # same batches for every run
    start = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    row = dict(step=step or "baseline", strength=strength if step else 0.0,
               accuracy=100 * accuracy, seconds=seconds)
    if step is not None:
        row["inactive"] = len(ls.regularized_layers(model)) - history.history[
            "active_layers"][-1]
        row["blocks"] = len(ls.regularized_layers(model))
        row["negative_gamma"] = sum(
            int(np.sum(keras.ops.convert_to_numpy(layer.gamma) < 0))
            for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    folded, report = ls.fold(model, nonnegative_inputs=True, policy="depth",
                             return_report=True)
    errors = ls.compare_outputs(model, folded, x_test)
    row["layers_after"] = _convs(folded)
    row["fold_error"] = max(rel for _, rel in errors.values())
    row["reverted"] = len(report.reverted)
    if step is not None and args.refit_epochs:
        # the paper's last stage: the condensed net trained on without the penalty
        keras.utils.set_random_seed(args.seed)
        refitted, _ = ls.refit(model, x_train, y_train, nonnegative_inputs=True,
                               policy="depth", warm_start=True,
                               optimizer=_optimizer(args.optimizer, _steps(
                                   len(x_train), args.refit_epochs)), batch_size=64,
                               epochs=args.refit_epochs, verbose=0)
        _, refit_accuracy = refitted.evaluate(x_test, y_test, batch_size=500, verbose=0)
        row["refit_accuracy"] = 100 * refit_accuracy
    return row


def _percent(value):
    return "-" if value is None else f"{value:.2f}"


def table(rows, layers_before):
    lines = [
        "| step | strength | test accuracy (%) | inactive blocks | conv+dense after fold "
        f"(of {layers_before}) | fold max rel. error | gamma < 0 channels | train s "
        "| after refit (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inactive = f"{r['inactive']} / {r['blocks']}" if "inactive" in r else "-"
        lines.append(
            f"| {r['step']} | {r['strength']:g} | {r['accuracy']:.2f} | {inactive} "
            f"| {r['layers_after']} | {r['fold_error']:.1e} | {r.get('negative_gamma', '-')} "
            f"| {r['seconds']:.0f} | {_percent(r.get('refit_accuracy'))} |")
    return "\n".join(lines)


def main(args):
    start = time.perf_counter()
    *data, source = fashion_subset(args.n_train, args.n_test, args.seed, args.quick)
    base = conv_bn_net(args.seed)
    print(f"# backend {keras.backend.backend()}; data: {source}; {args.n_train} training / "
          f"{args.n_test} test images; {args.epochs} epochs, batch 64, {args.optimizer} "
          "(cosine decay)",
          flush=True)
    rows = [run_one(base, None, 0.0, data, args)]
    for strength in args.strengths:
        for step in args.steps:
            rows.append(run_one(base, step, strength, data, args))
            r = rows[-1]
            print(f"# {step} s={strength:g}: acc {r['accuracy']:.2f}% inactive "
                  f"{r['inactive']}/{r['blocks']} layers after fold {r['layers_after']} "
                  f"error {r['fold_error']:.1e} ({r['seconds']:.0f} s) refit "
                  f"{_percent(r.get('refit_accuracy'))}", flush=True)
    print(table(rows, _convs(base)))
    bad = [r for r in rows if r["fold_error"] > 1e-5]
    print(f"# fold max rel. error <= 1e-5 in {len(rows) - len(bad)} of {len(rows)} runs; "
          f"total {time.perf_counter() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
