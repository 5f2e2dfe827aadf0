"""What a `BiasMap` costs at inference: one broadcast add, or a gather per call.

The net is the convnet study's MobileNet-style network (28x28x1 input,
inverted residual blocks at 14x14, 7x7 and 4x4, `experiments/convnet.py`)
with every ReLU an identity (`tests/zoo.py`), so that `fold` turns each
inverted residual into one 3x3 'same' convolution. Four forms of it, timed
side by side:

- "unfolded": the user's model, BatchNormalization and all;
- "padded": the same weights with each block's expand layer reading its
  input zero-padded by one and a 'valid' depthwise convolution, folded: the
  expand bias sees the padding too, so the merged convolutions carry an
  ordinary bias and no `BiasMap` (the cheapest the folded net can be; its
  outputs differ from the others' at the borders);
- "BiasMap gather": the folded 'same' net with the former `BiasMap`, which
  expanded its compact table with one gather per spatial axis and a cast on
  every call;
- "BiasMap": the folded 'same' net as `fold` builds it now (the full map
  expanded once when the table is set, one add per call).

Printed: max relative error of each form against the unfolded model on
fresh inputs (the padded form is another function at the borders),
parameters (`model_cost`), and Keras compiled
`predict_on_batch` latency at batch 1 and 64 (median over rounds that
alternate the forms in one process, `experiments/convnet_measure.py`).

    python benchmarks/bias_map_latency.py [--quick]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments import convnet  # noqa: E402
from tf_layersparse.experiments import convnet_measure as measure  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from zoo import make_identities  # noqa: E402


class GatherBiasMap(ls.BiasMap):
    """The former `BiasMap.call`: the table expanded on every call."""

    def call(self, inputs):
        full = keras.ops.convert_to_tensor(self.table)
        for axis, (n, t, r) in enumerate(zip(self.map_shape, self.table_shape, self.repeat_at)):
            if n != t:
                index = list(range(r)) + [r] * (n - t + 1) + list(range(r + 1, t))
                full = keras.ops.take(full, np.asarray(index, "int32"), axis=axis)
        return inputs + keras.ops.cast(full, inputs.dtype)


ls.registry.register(GatherBiasMap, ls.registry.Rule(ls.registry.BIAS_MAP))


def padded_twin(model):
    """`model` (the study's mobilenet) with `ZeroPadding2D(1)` before every
    expand layer and its depthwise convolution 'valid'; same weights."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.DepthwiseConv2D) and layer.padding == "same":
            config["padding"] = "valid"
        return type(layer).from_config(config)

    def call(layer, *args, **kwargs):
        if layer.name.endswith("_expand_conv"):
            args = (keras.layers.ZeroPadding2D(1, name=f"{layer.name}_pad")(args[0]),) + args[1:]
        return layer(*args, **kwargs)

    twin = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        if layer.weights:
            twin.get_layer(layer.name).set_weights(layer.get_weights())
    return twin


def with_gather_bias_maps(folded):
    """`folded` with every `BiasMap` replaced by a `GatherBiasMap`."""

    def clone(layer):
        cls = GatherBiasMap if type(layer) is ls.BiasMap else type(layer)
        return cls.from_config(layer.get_config())

    twin = keras.models.clone_model(folded, clone_function=clone)
    for layer in folded.layers:
        if layer.weights:
            twin.get_layer(layer.name).set_weights(layer.get_weights())
    return twin


def _count(model, cls):
    return sum(type(layer) is cls for layer in model.layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    args = parser.parse_args(argv)
    repeats = 7 if args.quick else 21

    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}")
    model = convnet.build("mobilenet")
    make_identities(model)
    folded = ls.fold(model, nonnegative_inputs=True)
    padded = ls.fold(padded_twin(model), nonnegative_inputs=True)
    models = {"unfolded": model, "padded": padded,
              "BiasMap gather": with_gather_bias_maps(folded), "BiasMap": folded}
    x = np.abs(np.random.default_rng(1).normal(size=(64,) + convnet.INPUT_SHAPE))
    x = x.astype("float32")
    for name, m in models.items():
        error = ls.compare_outputs(model, m, x)
        print(f"{name}: {ls.model_cost(m)}; BiasMap layers "
              f"{_count(m, ls.BiasMap) + _count(m, GatherBiasMap)}; max rel error "
              f"{max(rel for _, rel in error.values()):.1e}")
    for batch in (1, 64):
        ms = measure.keras_latency(models, batch, repeats=repeats,
                                   number=20 if batch == 1 else 3)
        print(f"predict_on_batch, batch {batch}: "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f" (BiasMap/padded x{ms['BiasMap'] / ms['padded']:.2f}, "
              f"gather/padded x{ms['BiasMap gather'] / ms['padded']:.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
