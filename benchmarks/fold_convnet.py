"""Worked examples: fold convolutional networks and print before/after.

    python benchmarks/fold_convnet.py [--quick]

1. A Conv-BN-ReLU network with 'valid' padding, two blocks inactive
   (non-negative effective weights, as training with the penalty would):
   depth, parameters, FLOPs and measured output error for both policies.
2. A MobileNetV2 inverted residual block (1x1 expand C->6C, 3x3 depthwise,
   1x1 project, Add) whose expand and depthwise ReLUs are identities: the
   default (cost) policy turns it into one 3x3 C->C convolution.
3. Fold time of keras.applications.ResNet50 (weights=None, 64x64 input),
   model construction excluded, with and without the self-check (median of
   3 runs; skipped with --quick).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402


def build(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(16, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv3")(h)
    h = keras.layers.Conv2D(16, 1, activation="relu", name="conv4")(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv5")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(h)
    model = keras.Model(inputs, outputs, name="convnet")
    rng = np.random.default_rng(seed)
    for name in ("conv2", "conv4"):
        layer = model.get_layer(name)
        layer.set_weights([np.abs(w) for w in layer.get_weights()])
    bn = model.get_layer("bn2")
    bn.set_weights([rng.uniform(0.5, 1.5, 16), rng.uniform(0, 1, 16),
                    -rng.uniform(0, 1, 16), rng.uniform(0.5, 2, 16)])
    return model


def inverted_residual(c=16, size=32, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, c), name="features")
    x = keras.layers.ReLU(name="input_relu")(inputs)
    h = keras.layers.Conv2D(6 * c, 1, use_bias=False, name="expand")(x)
    h = keras.layers.ReLU(name="expand_relu")(keras.layers.BatchNormalization(name="expand_bn")(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    h = keras.layers.ReLU(name="dw_relu")(keras.layers.BatchNormalization(name="dw_bn")(h))
    h = keras.layers.Conv2D(c, 1, use_bias=False, name="project")(h)
    h = keras.layers.BatchNormalization(name="project_bn")(h)
    model = keras.Model(inputs, keras.layers.Add(name="add")([x, h]), name="inverted_residual")
    rng = np.random.default_rng(seed)
    for name in ("expand", "dw"):
        layer = model.get_layer(name)
        layer.set_weights([np.abs(w) for w in layer.get_weights()])
    for name, channels in (("expand_bn", 6 * c), ("dw_bn", 6 * c), ("project_bn", c)):
        beta = np.zeros(channels) if name == "expand_bn" else rng.uniform(0, 1, channels)
        model.get_layer(name).set_weights([rng.uniform(0.5, 1.5, channels), beta,
                                           np.zeros(channels), np.ones(channels)])
    return model


def resnet50_fold_seconds(repeats=3):
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    ls.fold(model)  # warm-up: first calls build backend kernels
    rows = {}
    for label, kwargs in (("with self-check", {}), ("verify=False", {"verify": False})):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ls.fold(model, **kwargs)
            times.append(time.perf_counter() - start)
        rows[label] = sorted(times)[len(times) // 2]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the ResNet50 timing")
    args = parser.parse_args(argv)
    model = build()
    x = np.random.default_rng(1).uniform(size=(64, 28, 28, 1)).astype("float32")
    for policy in ("depth", "cost"):
        folded, report = ls.fold(model, nonnegative_inputs=True, policy=policy,
                                 verify=x, return_report=True)
        print(f"== convnet, policy={policy!r}")
        print(report)
        print()
    block = inverted_residual()
    folded, report = ls.fold(block, return_report=True)
    print("== inverted residual block, default policy")
    print(report)
    print(f"FLOPs x{report.after.flops / report.before.flops:.3f}, "
          f"parameters x{report.after.params / report.before.params:.3f}")
    print()
    if not args.quick:
        for label, seconds in resnet50_fold_seconds().items():
            print(f"ResNet50 64x64 fold ({label}), median of 3: {seconds:.2f} s "
                  f"on {os.cpu_count()} CPUs, backend {keras.backend.backend()}")


if __name__ == "__main__":
    main()
