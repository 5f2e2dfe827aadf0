"""Fold `keras.applications.MobileNetV2` as Keras builds it, and time it.

The model is MobileNetV2 (96x96x3 input, 1000 classes, `weights=None`) with
every ReLU(6.) replaced by ReLU() and weights as if layer sparsity had
switched every inverted residual off (`tests/zoo.py`). `fold` with the
default cost policy turns each inverted residual into one convolution and,
where the expand layer's bias meets 'same' or `ZeroPadding2D` borders, a
`BiasMap`. The reference is the original MobileNetV2 (ReLU(6.)) with its
BatchNormalization fused by `fold` (nothing else folds there: the capped
ReLUs are no identities).

Printed: fold time; FLOPs and parameters (`model_cost`); max relative
error of the folded model against the unfolded one on probe inputs (on the
softmax output and on the logits); the same after a `.keras` round trip and
after LiteRT conversion; Keras compiled-predict latency at batch 1 and 64
and LiteRT batch-1 latency, each a median over runs alternating between the
two models in one process (`tf_layersparse.experiments.convnet_measure`).
TensorFlow backend for the LiteRT part.

    python benchmarks/fold_mobilenetv2.py [--quick]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments import convnet_measure as measure  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from zoo import inactive_mobilenetv2  # noqa: E402

SHAPE = (96, 96, 3)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 15

    print(f"backend {keras.backend.backend()}, keras {keras.__version__}")
    original = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE)
    fused = ls.fold(original, nonnegative_inputs=True)
    print(f"BN-fused original: {ls.model_cost(fused)}")

    x = np.abs(np.random.default_rng(1).normal(size=(16,) + SHAPE)).astype("float32")
    rows = {}
    for head in ("softmax", None):
        model = inactive_mobilenetv2(SHAPE, classifier_activation=head)
        start = time.perf_counter()
        folded, report = ls.fold(model, nonnegative_inputs=True, return_report=True)
        seconds = time.perf_counter() - start
        rows[head] = (model, folded, report)
        error = _rel(keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(folded(x)))
        print(f"[{head or 'logits'}] fold {seconds:.1f} s; self-check max rel error "
              f"{report.max_relative_error:.2e}; on 16 fresh inputs {error:.2e}")
    model, folded, report = rows["softmax"]
    blocks = [t for t, members in report.merges if any(m.endswith("_expand") for m in members)]
    routes = {route: sum(1 for t in blocks if report.routes[t] == route)
              for route in set(report.routes.values())}
    print(f"inverted residuals folded into one conv: {len(blocks)} of 16 with an expand "
          f"layer; routes {routes}; merges in all: {len(report.merges)}")
    print(f"before: {report.before}")
    print(f"after:  {report.after}")
    print(f"FLOPs x{report.after.flops / report.before.flops:.3f}, "
          f"parameters x{report.after.params / report.before.params:.3f}; "
          f"against the BN-fused original: FLOPs "
          f"x{report.after.flops / ls.model_cost(fused).flops:.3f}, parameters "
          f"x{report.after.params / ls.model_cost(fused).params:.3f}")
    if report.skipped:
        print("not merged: " + "; ".join(f"{a} -> {b}: {r}" for a, b, r in report.skipped))

    logits_model, logits_folded, _ = rows[None]
    reference = keras.ops.convert_to_numpy(logits_model(x))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "folded.keras")
        logits_folded.save(path)
        loaded = keras.models.load_model(path)
        print(f".keras round trip: max rel error on logits "
              f"{_rel(reference, keras.ops.convert_to_numpy(loaded(x))):.2e}")
        if keras.backend.backend() != "tensorflow":
            print("LiteRT: skipped (needs the TensorFlow backend)")
            paths = None
        else:
            paths = {"BN-fused original": os.path.join(tmp, "fused.tflite"),
                     "folded": os.path.join(tmp, "folded.tflite")}
            sizes = {"BN-fused original": measure.to_tflite(fused, paths["BN-fused original"]),
                     "folded": measure.to_tflite(folded, paths["folded"])}
            logits_path = os.path.join(tmp, "logits.tflite")
            measure.to_tflite(logits_folded, logits_path)
            got = measure.tflite_predict(logits_path, x)
            print(f"LiteRT: max rel error on logits {_rel(reference, got):.2e}; size KiB "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
        models = {"BN-fused original": fused, "folded": folded}
        for batch in (1, 64):
            ms = measure.keras_latency(models, batch, repeats=repeats,
                                       number=5 if batch == 1 else 1)
            print(f"Keras predict_on_batch, batch {batch}: "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f" (folded/original x{ms['folded'] / ms['BN-fused original']:.2f})")
        if paths is not None:
            ms = measure.tflite_latency(paths, repeats=repeats)
            print("LiteRT batch 1 (2 threads): "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f" (folded/original x{ms['folded'] / ms['BN-fused original']:.2f})")


if __name__ == "__main__":
    main()
