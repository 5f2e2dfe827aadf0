"""One process of a multi-process run of a penalised MLP (tests/test_distributed.py).

    python tests/distributed_worker.py jax --rank 0 --world 2 --port 12345 --out DIR --target 2

Each process trains on its own half of every global batch and writes what
the test compares to DIR: `rank<i>.npz` (the weights, then the folded
model's outputs on a fixed input) and `rank<i>.json` (held layers, the
logged strength multipliers, the folded model's layers). `--world 1`
trains alone on the whole batch, for reference.

- jax: `keras.distribution.initialize` (JAX's coordinator, gloo
  collectives on CPU) and `DataParallel` over every process's devices;
  `model.fit` with `ActiveLayers`.
- torch: `torch.distributed` (gloo, env://) and `DistributedDataParallel`
  in a training loop of our own that still applies Keras' optimizer, and
  so the proximal steps, and calls `ActiveLayers`' hooks; `fit` does not
  go through the DDP wrapper (see `probe-fit`).
- probe-fit (torch): Keras' own `fit` on a DDP-wrapped model; writes each
  process's weights after one step on different data.
- tensorflow: `MultiWorkerMirroredStrategy` (TF_CONFIG from the caller).
  Keras' own `fit` of a one-layer model comes first; while that fails with
  the known PerReplica error, `rank<i>.json` says so and nothing else runs.
"""

import argparse
import json
import os
import sys

MODES = ("jax", "torch", "probe-fit", "tensorflow")
GLOBAL_BATCH, EPOCHS, N = 32, 16, 256


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1")
    parser.add_argument("--out", required=True, help="directory for the results")
    parser.add_argument("--target", type=int, default=0,
                        help="DepthTarget(inactive=TARGET); 0: plain ActiveLayers")
    return parser.parse_args(argv)


def data():
    import numpy as np

    x = np.random.default_rng(0).normal(size=(N, 4)).astype("float32")
    return x, (np.maximum(x[:, :1], 0) + 0.5 * x[:, 1:2]).astype("float32")


def local_part(array, rank, world, global_batch=GLOBAL_BATCH):
    """This process's rows of every global batch: a global batch is the
    processes' local batches one after the other, in process order."""
    local = global_batch // world
    return array.reshape(-1, world, local, *array.shape[1:])[:, rank].reshape(
        -1, *array.shape[1:])


def mlp(strength=0.01):
    import keras

    import tf_layersparse as ls

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="first")(inputs)
    for i in range(5):
        reg = ls.LayerSparsity(strength, group="layer")
        h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                               bias_regularizer=reg, name=f"hidden{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def target(inactive):
    """The depth target of these runs; None (plain `ActiveLayers`) for 0."""
    import tf_layersparse as ls

    if not inactive:
        return None
    return ls.DepthTarget(inactive=inactive, end_step=96, frequency=4, growth=1.3)


def probe_input():
    import numpy as np

    return np.random.default_rng(7).normal(size=(16, 4)).astype("float32")


def write(args, model, active, multipliers):
    import keras
    import numpy as np

    import tf_layersparse as ls

    rank, out = args.rank, args.out
    weights = model.get_weights()
    folded = ls.fold(model)
    outputs = keras.ops.convert_to_numpy(folded(probe_input()))
    progress = active.progress
    np.savez(os.path.join(out, f"rank{rank}.npz"), *weights, folded=outputs)
    if rank == 0:  # every process holds the same model: one writes it
        folded.save(os.path.join(out, "folded.keras"))
    summary = {
        "held": None if progress is None else list(progress.held),
        "reached": None if progress is None else progress.reached,
        "multipliers": [float(m) for m in multipliers],
        "active_layers": active.history["active_layers"],
        "fold_layers": [layer.name for layer in folded.layers],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def run_jax(args):
    import jax
    import keras

    import tf_layersparse as ls

    rank, world, port = args.rank, args.world, args.port
    x, y = data()
    if world > 1:
        # gloo is the default from jax 0.4.36 on; older releases had none on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(f"127.0.0.1:{port}", world, rank)
    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    # each process passes its own rows (numpy arrays: Keras shards only tf.data)
    distribution.auto_shard_dataset = False
    x_local, y_local = local_part(x, rank, world), local_part(y, rank, world)
    depth_target = target(args.target)
    with distribution.scope():
        model = mlp()
        model.compile(keras.optimizers.SGD(0.05), "mse")
        active = ls.ActiveLayers(target=depth_target)
        # fit's batch_size is per process: Keras assembles the global batch
        # from every process's local one
        history = model.fit(x_local, y_local, batch_size=GLOBAL_BATCH // world,
                            epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[active])
    # outside the scope: fold builds a model of this process only
    write(args, model, active, history.history.get("strength_multiplier", []))


def run_torch(args):
    import keras
    import torch
    import torch.distributed as dist

    import tf_layersparse as ls

    rank, world = args.rank, args.world
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    x, y = data()
    x_local, y_local = local_part(x, rank, world), local_part(y, rank, world)
    batch_size, epochs = GLOBAL_BATCH // world, EPOCHS
    model = mlp()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = keras.losses.MeanSquaredError()
    depth_target = target(args.target)
    active = ls.ActiveLayers(target=depth_target)
    steps = len(x_local) // batch_size
    active.set_model(model)
    active.set_params({"epochs": epochs, "steps": steps, "verbose": 0})
    active.on_train_begin()
    multipliers = []
    for epoch in range(epochs):
        active.on_epoch_begin(epoch)
        seen = 0.0
        for step in range(steps):
            batch = slice(step * batch_size, (step + 1) * batch_size)
            inputs, targets = torch.as_tensor(x_local[batch]), torch.as_tensor(y_local[batch])
            # DDP averages the gradients over processes during backward
            loss = loss_fn(targets, ddp(inputs))
            model.zero_grad()
            loss.backward()
            variables = model.trainable_weights
            with torch.no_grad():
                # Keras' optimizer, so the constraints (the proximal steps) run
                model.optimizer.apply([v.value.grad for v in variables], variables)
            shared = loss.detach().clone()
            dist.all_reduce(shared)  # the target's loss guard reads the mean over processes
            seen += float(shared) / world
            active.on_train_batch_end(step, {"loss": seen / (step + 1)})
        logs = {}
        active.on_epoch_end(epoch, logs)
        multipliers.append(logs.get("strength_multiplier"))
    active.on_train_end()
    write(args, model, active, [m for m in multipliers if m is not None])
    dist.destroy_process_group()


def probe_fit(args):
    import keras
    import numpy as np
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", init_method="env://", rank=args.rank,
                            world_size=args.world)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    value = np.full((1, 1), float(args.rank + 1), "float32")
    model.fit(value, value, batch_size=1, epochs=1, verbose=0)
    np.savez(os.path.join(args.out, f"rank{args.rank}.npz"), *model.get_weights())


KNOWN_TF_ERROR = "PerReplica"  # Keras 3's fit under MultiWorkerMirroredStrategy


def run_tensorflow(args):
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_layersparse as ls

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        probe = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        probe.compile("sgd", "mse")
    try:
        probe.fit(np.ones((64, 4), "float32"), np.ones((64, 1), "float32"), batch_size=32,
                  epochs=1, verbose=0)
    except ValueError as error:
        if KNOWN_TF_ERROR not in str(error):
            raise
        with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
            json.dump({"plain_fit_fails": str(error).splitlines()[0][:300]}, f)
        return
    x, y = data()
    with strategy.scope():
        model = mlp()
        model.compile(keras.optimizers.SGD(0.05), "mse")
    active = ls.ActiveLayers(target=target(args.target))
    # under this strategy fit's batch is the global one, sharded by the strategy
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0, callbacks=[active])
    write(args, model, active, history.history.get("strength_multiplier", []))


def main(argv=None):
    args = _parse(argv)
    os.environ["KERAS_BACKEND"] = "torch" if args.mode == "probe-fit" else args.mode
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = {"jax": run_jax, "torch": run_torch, "probe-fit": probe_fit,
            "tensorflow": run_tensorflow}
    runs[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
