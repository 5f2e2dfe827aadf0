"""Speed of the batched trainer against one `model.fit` per network.

    python benchmarks/batched_speedup.py           # ~2 minutes on 2 cores
    python benchmarks/batched_speedup.py --quick   # seconds; what the tests run

Both routes train the networks of the simulation study (l-1 = 10 hidden
layers of width 5, batch 10, SGD lr 1e-2, layer penalty 0.2 with proximal
steps): the naive route builds each network with `apply_layer_sparsity`
and calls `model.fit`; the batched route trains the same number of networks
per setting as Table 1 does (30 runs x LS/SLS/ILS) in one `BatchedMLP`.
Both are timed in this one process, so the ratio is measured side by side.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments.batched import BatchedMLP  # noqa: E402
from tf_layersparse.experiments.simulation_study import SETTINGS  # noqa: E402
from tf_layersparse.simulation import relu_mlp, simulate  # noqa: E402


def naive(datasets, epochs, strength):
    start = time.perf_counter()
    for i, data in enumerate(datasets):
        model = ls.apply_layer_sparsity(relu_mlp(2, 10, 5, seed=i), strength)
        model.compile(keras.optimizers.SGD(1e-2), "mse")
        model.fit(data.x_train, data.y_train, batch_size=10, epochs=epochs,
                  verbose=0, shuffle=True)
    return (time.perf_counter() - start) / len(datasets)


def batched(datasets, epochs, strength):
    start = time.perf_counter()
    # per-tensor penalty: the same objective `apply_layer_sparsity` gives the naive route
    net = BatchedMLP([2] + [5] * 10 + [1], len(datasets), seed=0, penalty_group="tensor")
    net.fit(np.stack([d.x_train for d in datasets]), np.stack([d.y_train for d in datasets]),
            epochs=epochs, batch_size=10, learning_rate=1e-2, strengths=strength)
    return (time.perf_counter() - start) / len(datasets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--naive-networks", type=int, default=3)
    args = parser.parse_args(argv)
    epochs = 5 if args.quick else 200
    n_naive = 1 if args.quick else args.naive_networks
    n_batched = 4 if args.quick else 90
    datasets = [simulate(10, 0.1, seed=i) for i in range(n_batched)]
    t_naive = naive(datasets[:n_naive], epochs, 0.2)
    t_batched = batched(datasets, epochs, 0.2)
    speedup = t_naive / t_batched
    total = sum(4 * 30 * (s.epochs / epochs) for s in SETTINGS)  # network-epochs / epochs
    deep = sum(4 * 30 * (s.epochs / epochs) * (s.hidden_layers / 10) for s in SETTINGS)
    print(f"{epochs} epochs per network, l-1 = 10, batch 10")
    print(f"one model.fit per network: {t_naive:8.3f} s per network ({n_naive} networks)")
    print(f"BatchedMLP, {n_batched:3d} at once:   {t_batched:8.3f} s per network")
    print(f"speed-up: {speedup:.1f}x")
    print(f"naive route for the full Table 1 (720 networks, epochs per setting, time "
          f"scaled by depth): about {t_naive * deep / 60:.0f} min "
          f"(without the depth scaling {t_naive * total / 60:.0f} min)")
    return speedup


if __name__ == "__main__":
    main()
