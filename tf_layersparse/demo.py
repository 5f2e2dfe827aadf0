"""End-to-end demo on the paper's simulated data; runs offline.

    python -m tf_layersparse.demo            # l-1 = 10, s_W = 0.1, 200 epochs
    python -m tf_layersparse.demo --quick    # a few epochs, for smoke tests

Trains plain least squares (LS) and the layer-sparse network (SLS) with SGD
(batch 10, lr 1e-2), folds the inactive layers away, refits the condensed
network (FLS), and prints a before/after table. TensorFlow's C++ log lines
are hidden unless TF_CPP_MIN_LOG_LEVEL is set (`tf_layersparse.console`).
"""

import argparse
import sys
import time

import keras
import numpy as np

import tf_layersparse as ls
from tf_layersparse.simulation import relu_mlp, simulate


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tf_layersparse.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--hidden-layers", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.1,
                        help="s_W, the chance that a layer is active")
    parser.add_argument("--strength", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="5 epochs: checks the pipeline, not the method")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2))
    return parser.parse_args(argv)


def _test_mse(model, data):
    pred = model.predict(data.x_test, verbose=0, batch_size=len(data.x_test))
    return float(np.mean((pred - data.y_test) ** 2))


def _fit(model, data, epochs, verbose, callbacks=()):
    # several tiny steps per compiled call; Keras' torch trainer allows only one
    steps = 1 if keras.backend.backend() == "torch" else 10
    model.compile(keras.optimizers.SGD(1e-2), "mse", steps_per_execution=steps)
    return model.fit(data.x_train, data.y_train, batch_size=10, epochs=epochs,
                     verbose=verbose, callbacks=list(callbacks), shuffle=True)


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    epochs = 5 if args.quick else args.epochs
    keras.utils.set_random_seed(args.seed)
    data = simulate(args.hidden_layers, args.sparsity, seed=args.seed)
    print(f"Simulated data: {args.hidden_layers} hidden layers of width 5, "
          f"s_W = {args.sparsity}; true active hidden layers (after the first):"
          f" {data.true_active} of {args.hidden_layers - 1}")
    start = time.perf_counter()

    print(f"[1/3] LS: least squares, {epochs} epochs")
    plain = relu_mlp(2, args.hidden_layers, 5, name="ls", seed=args.seed)
    _fit(plain, data, epochs, args.verbose)

    print(f"[2/3] SLS: least squares + layer penalty {args.strength}")
    base = relu_mlp(2, args.hidden_layers, 5, name="sls", seed=args.seed)
    sparse = ls.apply_layer_sparsity(base, args.strength)
    tracker = ls.ActiveLayers()
    _fit(sparse, data, epochs, args.verbose, [tracker])
    counts = tracker.history["active_layers"]
    marks = sorted({0, len(counts) // 4, len(counts) // 2, len(counts) - 1})
    print("      active_layers by epoch: "
          + ", ".join(f"{e + 1}: {counts[e]}" for e in marks))

    folded, report = ls.fold(sparse, verify=data.x_test, return_report=True)
    print(f"      fold: {report.after.depth} affine layers left of "
          f"{report.before.depth}; max relative output error "
          f"{report.max_relative_error:.2e}")

    print("[3/3] FLS: refit the folded network without the penalty")
    refitted, _ = ls.refit(sparse, data.x_train, data.y_train, epochs=epochs,
                           batch_size=10, verbose=args.verbose, seed=args.seed)

    rows = [
        ("LS", plain, ls.model_cost(plain), "-"),
        ("SLS", sparse, report.before, str(counts[-1])),
        ("SLS folded", folded, report.after, str(counts[-1])),
        ("FLS (refit)", refitted, ls.model_cost(refitted), str(counts[-1])),
    ]
    print()
    print(f"{'model':12} {'affine layers':>13} {'parameters':>10} "
          f"{'test mse':>9} {'active hidden':>13}")
    for name, model, cost, active in rows:
        print(f"{name:12} {cost.depth:>13} {cost.params:>10} "
              f"{_test_mse(model, data):>9.4f} {active:>13}")
    print(f"\nTrue active hidden layers: {data.true_active}. "
          f"Wall time: {time.perf_counter() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
