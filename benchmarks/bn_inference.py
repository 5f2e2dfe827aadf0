"""Inference vs training-mode accuracy of a depth-targeted BN convnet.

    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/bn_inference.py \\
        --optimizer adam --epochs 2 [--no-target] [--stats]

The study's MobileNet-style net (`experiments.convnet.build("mobilenet")`)
on Fashion-MNIST (`--n-train` images, default 20,000), penalised with
`apply_layer_sparsity(net, 1e-3, nonnegative_inputs=True)` and asked for
`DepthTarget(flops=--flops)` (every block at 0.66), validation data the
first `--n-test` test images. Each epoch it prints the validation accuracy in
inference mode (moving statistics) and in training mode (batch statistics,
batches of 64, nothing updated); with `--stats`, at the end, for each
BatchNormalization layer, how far its moving mean and variance are from the
mean and variance of its input in inference mode on the validation images
(mean offset in standard deviations, variance ratio moving / actual).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from block_formulations import fashion_subset  # noqa: E402
from tf_layersparse.experiments import convnet  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def training_mode_accuracy(model, x, y, batch_size=64):
    """Accuracy with batch statistics (`training=True`), statistics left alone."""
    saved = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    right = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size], training=True)
        right += int(np.sum(np.argmax(keras.ops.convert_to_numpy(logits), -1)
                            == y[start:start + batch_size]))
    for v, s in zip(model.non_trainable_variables, saved):
        v.assign(s)
    return 100 * right / len(x)


def inference_accuracy(model, x, y):
    logits = model.predict(x, batch_size=500, verbose=0)
    return 100 * float(np.mean(np.argmax(logits, -1) == y))


def bn_statistics(model, x):
    """`{bn: (max |mean offset| / std, median, min var ratio, median var ratio)}`."""
    bns = [layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.inputs, [bn.input for bn in bns])
    inputs = probe.predict(x, batch_size=500, verbose=0)
    found = {}
    for bn, h in zip(bns, inputs):
        h = h.reshape(-1, h.shape[-1]).astype(np.float64)
        mean, var = h.mean(0), h.var(0)
        moving_mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
        moving_var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
        offset = np.abs(moving_mean - mean) / np.sqrt(var + bn.epsilon)
        ratio = (moving_var + bn.epsilon) / (var + bn.epsilon)
        found[bn.name] = (float(offset.max()), float(np.median(offset)),
                          float(ratio.min()), float(np.median(ratio)))
    return found


class EpochAccuracy(keras.callbacks.Callback):
    def __init__(self, x, y, out):
        super().__init__()
        self.x, self.y, self.out = x, y, out

    def on_epoch_end(self, epoch, logs=None):
        row = dict(epoch=epoch + 1,
                   inference=inference_accuracy(self.model, self.x, self.y),
                   training_mode=training_mode_accuracy(self.model, self.x, self.y),
                   **{k: float(v) for k, v in (logs or {}).items()})
        self.out.append(row)
        print(json.dumps(row), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--flops", type=float, default=0.66)
    parser.add_argument("--no-target", action="store_true")
    parser.add_argument("--stats", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    x, y, xt, yt, source = fashion_subset(args.n_train, args.n_test, args.seed, args.quick)
    base = convnet.build("mobilenet", seed=args.seed, small=args.quick)
    steps = -(-len(x) // 64)
    if args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = convnet.TrainConfig(epochs=args.epochs).optimizer(steps)
    callbacks, rows = [], []
    if args.no_target:
        model = base
    else:
        model = ls.apply_layer_sparsity(base, 1e-3, nonnegative_inputs=True)
        steering = ls.ActiveLayers(target=ls.DepthTarget(flops=args.flops),
                                   nonnegative_inputs=True)
        callbacks.append(steering)
    callbacks.append(EpochAccuracy(xt, yt, rows))
    model.compile(optimizer, LOSS, metrics=["accuracy"])
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=args.epochs, validation_data=(xt, yt), verbose=0,
              callbacks=callbacks)
    print(json.dumps(dict(seconds=time.perf_counter() - start, source=source,
                          backend=keras.backend.backend(), optimizer=args.optimizer,
                          target=not args.no_target,
                          progress=None if args.no_target else str(steering.progress))),
          flush=True)
    if not args.no_target:
        folded = ls.fold(model, nonnegative_inputs=True)
        errors = ls.compare_outputs(model, folded, xt[:500])
        print(json.dumps(dict(fold_error=max(rel for _, rel in errors.values()),
                              depth=(ls.model_cost(model).depth, ls.model_cost(folded).depth),
                              held=steering.progress.held if hasattr(steering.progress, "held")
                              else None)), flush=True)
    if args.stats:
        for name, figures in bn_statistics(model, xt).items():
            print(name, " ".join(f"{f:.3f}" for f in figures), flush=True)


if __name__ == "__main__":
    main()
