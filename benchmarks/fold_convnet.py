"""Worked example: fold a small convolutional network and print before/after.

    python benchmarks/fold_convnet.py

Builds a Conv-BN-ReLU network with 'valid' padding, makes two blocks
inactive (non-negative effective weights, as training with the penalty
would), folds it, and prints depth, parameters, FLOPs and the measured
output error for both policies.
"""

import os

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


def main():
    model = build()
    x = np.random.default_rng(1).uniform(size=(64, 28, 28, 1)).astype("float32")
    for policy in ("depth", "cost"):
        folded, report = ls.fold(model, nonnegative_inputs=True, policy=policy,
                                 verify=x, return_report=True)
        print(f"== policy={policy!r}")
        print(report)
        print()


if __name__ == "__main__":
    main()
