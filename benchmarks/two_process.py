"""Depth target on two JAX processes against one, on the paper's MNIST MLP.

    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/two_process.py
    python benchmarks/two_process.py --quick      # random pixels, tiny, about a minute

The network is the paper's: 784 -> 10 hidden ReLU layers of width 50 -> 10
logits, hidden layers 2-10 penalised (kernel and bias in one norm,
starting strength 1e-3), SGD 0.05, trained with
`ActiveLayers(target=DepthTarget(inactive=5))`. It trains twice on the
same global batches (the training images in one fixed random order,
`shuffle=False`): once in one process, once in two local processes, each
giving half of every global batch (`keras.distribution.initialize()`,
which reads the coordinator 127.0.0.1:<port>, the process count and the
process index from KERAS_DISTRIBUTION_* variables, and `DataParallel`
over both processes' devices). Both runs use JAX on the CPU, one after
the other.

Printed per run: the held layers in the order they were held, whether the
target was reached, the final strength multiplier, test accuracy of the
folded model, the layers fold removed, and the wall time of `fit` (the
slowest process's, for two). For two processes, also whether both ended
with bit-identical weights and held layers.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="random pixels, 2,000 training images, 2 epochs")
    parser.add_argument("--train", type=int, default=10_000, help="training images")
    parser.add_argument("--test", type=int, default=10_000, help="test images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="global batch size")
    parser.add_argument("--target", type=int, default=5, help="layers to switch off")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds before the workers are stopped")
    parser.add_argument("--worker", nargs=4, metavar=("DATA", "OUT", "RANK", "WORLD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs = 2_000, 500, 2
    return args


def worker(args):
    """One process: train, fold, evaluate; writes `<OUT>/rank<i>.json`."""
    os.environ["KERAS_BACKEND"] = "jax"
    data_path, out, rank, world = args.worker
    rank, world = int(rank), int(world)
    import keras
    import numpy as np

    import tf_layersparse as ls
    from adam_vs_sgd import paper_mlp
    from distributed_worker import local_part

    if world > 1:
        # KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID (set by `_run`)
        keras.distribution.initialize()
    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    distribution.auto_shard_dataset = False  # each process passes its own rows
    with np.load(data_path) as data:
        x, y, x_test, y_test = (data[k] for k in ("x", "y", "x_test", "y_test"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with distribution.scope():
        model = ls.apply_layer_sparsity(paper_mlp(), 1e-3, group="layer")
        model.compile(keras.optimizers.SGD(0.05), loss)
        # random pixels (--quick) never take off: warm up for a tenth of the steps
        target = ls.DepthTarget(inactive=args.target, wait_for_takeoff=not args.quick)
        callback = ls.ActiveLayers(target=target)
        start = time.perf_counter()
        model.fit(local_part(x, rank, world, args.batch), local_part(y, rank, world, args.batch),
                  batch_size=args.batch // world, epochs=args.epochs, shuffle=False,
                  verbose=0, callbacks=[callback])
        seconds = time.perf_counter() - start
    folded = ls.fold(model)  # outside the scope: a model of this process only
    logits = keras.ops.convert_to_numpy(folded.predict(x_test, batch_size=1000, verbose=0))
    weights = model.get_weights()
    progress = callback.progress
    summary = {
        "held": list(progress.held), "reached": progress.reached,
        "multiplier": progress.multiplier, "seconds": seconds,
        "accuracy": 100 * float(np.mean(np.argmax(logits, 1) == y_test)),
        "removed": [layer.name for layer in model.layers
                    if layer.name not in {f.name for f in folded.layers}],
        "checksum": float(sum(np.sum(w.astype("float64")) for w in weights)),
    }
    np.savez(os.path.join(out, f"rank{rank}.npz"), *weights)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    return 0


def _run(args, data_path, world):
    import numpy as np

    from multiprocess import free_port, run_workers

    out = tempfile.mkdtemp(prefix=f"two_process_{world}_")
    address = f"127.0.0.1:{free_port()}"
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
            "--epochs", str(args.epochs), "--target", str(args.target)] + (
                ["--quick"] if args.quick else [])
    envs = [dict(os.environ, KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                 KERAS_DISTRIBUTION_NUM_PROCESSES=str(world),
                 KERAS_DISTRIBUTION_PROCESS_ID=str(rank)) for rank in range(world)]
    run_workers([base + ["--worker", data_path, out, str(rank), str(world)]
                 for rank in range(world)], env=envs, timeout=args.timeout)
    results = []
    for rank in range(world):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    same = True
    if world > 1:
        arrays = [np.load(os.path.join(out, f"rank{rank}.npz")) for rank in range(world)]
        same = all(np.array_equal(arrays[0][k], a[k]) for a in arrays[1:] for k in a.files)
        same = same and all(r["held"] == results[0]["held"] for r in results)
    row = dict(results[0], seconds=max(r["seconds"] for r in results), agree=same)
    return row


def main(argv=None):
    args = _parse(argv)
    if args.worker:
        return worker(args)
    import numpy as np

    from adam_vs_sgd import mnist_subset

    if args.train % args.batch or args.batch % 2:
        raise SystemExit("--train must be a multiple of --batch, and --batch even")
    x, y, x_test, y_test, source = mnist_subset(args.train, args.test, 0, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        # the workers read arrays, not TFDS: loading is done once, here
        np.savez(data_path, x=x.reshape(len(x), -1), y=y,
                 x_test=x_test.reshape(len(x_test), -1), y_test=y_test)
        rows = {world: _run(args, data_path, world) for world in (1, 2)}
    print(f"MNIST MLP, DepthTarget(inactive={args.target}), {args.train} training images "
          f"({source}), {args.test} test, global batch {args.batch}, {args.epochs} epochs, "
          "JAX on CPU\n")
    print("| processes | held (in order) | reached | multiplier | test accuracy (%) "
          "| layers removed by fold | fit s | processes agree |")
    print("|---|---|---|---|---|---|---|---|")
    for world, r in rows.items():
        print(f"| {world} | {', '.join(r['held'])} | {r['reached']} | {r['multiplier']:.3g} "
              f"| {r['accuracy']:.2f} | {len(r['removed'])} | {r['seconds']:.1f} "
              f"| {'yes' if r['agree'] else 'NO'} |")
    return 0 if rows[2]["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
