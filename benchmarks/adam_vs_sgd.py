"""Layer sparsity with adaptive optimizers against SGD on the paper's MNIST MLP (issue 10, item 3).

    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/adam_vs_sgd.py
    python benchmarks/adam_vs_sgd.py --quick      # random data, tiny, seconds

The network is the paper's (Section 3.2, as in `real-data`): 784 -> 10
hidden ReLU layers of width 50 -> 10 logits, softmax cross-entropy, batch
100. It is trained through the library's one-line route,
`ls.apply_layer_sparsity(model, s, group="layer")` (kernel and bias in one
norm, the paper's Section 2.5; the first layer reads pixels but, as in the
paper, is not penalised, so hidden layers 2 to 10 are), whose `fit` takes
the proximal step after every optimizer update: with SGD at the learning
rate, with Adam/AdamW/RMSprop in the optimizer's per-coordinate metric
(see `tf_layersparse.proximal`).

Strengths. The objective `loss + s * sum ||min(W, 0)||` does not depend on
the optimizer, so every optimizer gets the same strengths: the paper's
theory value `ln(p)/sqrt(n)` (0.1105 for n = 10,000, as in `real-data`)
times each `--strength-scale` (default 1 and 3). Learning rates are each
optimizer's usual one: SGD 0.05 (the `real-data` setting, which trains this
net), Adam/AdamW/RMSprop 1e-3 (AdamW weight decay 1e-4). Each optimizer also
trains the same net without penalty (strength 0, plain `fit`) for reference.

Printed per run: test accuracy of the penalised net, active penalised
layers at the end (`ActiveLayers`, exact zeros: tolerance 0), the number of
Dense layers after `ls.fold`, and the fold's max relative output error on
2,000 test images (measured here with `compare_outputs`, independent of the
fold's own self-check). Same seed, same initial weights, same batches for
every run.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments.datasets import load_images  # noqa: E402
from tf_layersparse.experiments.real_data import theory_strength  # noqa: E402

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


def make_optimizer(name):
    """A fresh optimizer with its usual learning rate for this net."""
    return {
        "sgd": lambda: keras.optimizers.SGD(0.05),
        "sgdm": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
    }[name]()


def paper_mlp(width=50, hidden=10, seed=0):
    """784 -> `hidden` ReLU layers of `width` -> 10 logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,))
    h = inputs
    for i in range(hidden):
        h = keras.layers.Dense(width, activation="relu", name=f"hidden{i + 1}")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="mnist_mlp")


def mnist_subset(n_train, n_test, seed, quick):
    """(x_train, y_train, x_test, y_test, source); random pixels with --quick."""
    rng = np.random.default_rng(seed)
    if quick:
        x = rng.uniform(size=(n_train + n_test, 784)).astype("float32")
        y = rng.integers(0, 10, size=n_train + n_test).astype("int32")
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:], "random (--quick)"
    images = load_images("mnist")
    train = rng.permutation(len(images.x_train))[:n_train]
    return (images.x_train[train], images.y_train[train], images.x_test[:n_test],
            images.y_test[:n_test], images.source)


def _dense_count(model):
    return sum(isinstance(layer, keras.layers.Dense) for layer in model.layers)


def run_one(base, optimizer, strength, data, epochs, seed):
    """Train a copy of `base`; returns one result row."""
    x_train, y_train, x_test, y_test = data
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if strength > 0:
        model = ls.apply_layer_sparsity(base, strength, group="layer")
    else:
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
    model.compile(make_optimizer(optimizer), loss, metrics=["accuracy"])
    keras.utils.set_random_seed(seed)  # same batches for every run
    start = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=100, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    row = dict(optimizer=optimizer, strength=strength, accuracy=100 * accuracy,
               loss=history.history["loss"][-1], seconds=seconds)
    if strength > 0:
        row["active"] = history.history["active_layers"][-1]
        row["penalised"] = len(ls.regularized_layers(model))
        folded = ls.fold(model)
        probe = x_test[:2000]
        errors = ls.compare_outputs(model, folded, probe)
        row["depth"] = _dense_count(folded)
        row["fold_error"] = max(rel for _, rel in errors.values())
    return row


def table(rows, depth):
    lines = [
        "| optimizer | strength | test accuracy (%) | final train loss | active / penalised "
        "| Dense layers after fold | fold max rel. error | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["strength"] > 0:
            sparse = (f"{r['active']} / {r['penalised']} | {r['depth']} "
                      f"| {r['fold_error']:.1e}")
        else:
            sparse = f"- | {depth} (no penalty) | -"
        lines.append(f"| {r['optimizer']} | {r['strength']:.4g} | {r['accuracy']:.2f} "
                     f"| {r['loss']:.3f} | {sparse} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--strength-scale", nargs="+", type=float, default=[1.0, 3.0],
                        help="multiples of the theory strength ln(p)/sqrt(n)")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unpenalised run per optimizer")
    parser.add_argument("--quick", action="store_true", help="random data, tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs = 500, 200, 2
        args.optimizers, args.strength_scale = ["sgd", "adam"], [1.0]
    start = time.perf_counter()
    *data, source = mnist_subset(args.n_train, args.n_test, args.seed, args.quick)
    base = paper_mlp(seed=args.seed)
    theory = theory_strength(base.count_params(), args.n_train)
    print(f"# backend {keras.backend.backend()}; data: {source}; {args.n_train} training / "
          f"{args.n_test} test images; {args.epochs} epochs, batch 100; theory strength "
          f"ln({base.count_params()})/sqrt({args.n_train}) = {theory:.4f}", flush=True)
    rows = []
    for optimizer in args.optimizers:
        scales = ([] if args.no_baseline else [0.0]) + args.strength_scale
        for scale in scales:
            row = run_one(base, optimizer, scale * theory, data, args.epochs, args.seed)
            rows.append(row)
            print(f"# {optimizer} s={row['strength']:.4g}: acc {row['accuracy']:.2f}% "
                  f"active {row.get('active', '-')} depth {row.get('depth', '-')} "
                  f"({row['seconds']:.0f} s)", flush=True)
    print(table(rows, _dense_count(base)))
    print(f"# total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
