"""Latency and size of the convnet study's models, in Keras and in LiteRT (TFLite).

Every latency is a median over alternating runs in one process: round `r`
times model A, then B, then C, ..., so that load from other processes
(a shared 2-core machine) hits every model alike, and the ratios between
models are measured side by side. Each model is warmed up first.

- `keras_latency`: compiled predict (`predict_on_batch`, a `tf.function`
  on the TensorFlow backend), at the given batch sizes, milliseconds per
  batch.
- `to_tflite`: converts a Keras model to a LiteRT (TFLite) flatbuffer:
  float32 with no optimization (size and speed changes come from the
  architecture alone), or full-integer int8 by post-training quantization
  calibrated on `representative` images; `tflite_latency`: batch-1
  latency in the LiteRT interpreter (`ai_edge_litert`, or TensorFlow's
  deprecated `tf.lite.Interpreter` where it is not installed) with
  `threads` threads; `tflite_predict`: its outputs.
"""

import os
import tempfile
import time

import numpy as np

__all__ = ["keras_latency", "to_tflite", "tflite_latency", "tflite_predict"]


def _median_alternating(calls, repeats, number):
    """`calls[name]()` timed `number` times per round, `repeats` rounds, names alternating;
    median milliseconds per call."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(number):
                call()
            times[name].append((time.perf_counter() - start) / number * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def keras_latency(models, batch_size, repeats=15, number=5, warmup=3, seed=0):
    """Median ms per compiled `predict_on_batch` of a `batch_size` batch, per model.

    `models` maps names to Keras models with input (28, 28, 1) or any shape
    (taken from each model's input). Returns `{name: ms}`.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> sorted(keras_latency({"a": m}, 8, repeats=2, number=1, warmup=1))
    ['a']
    """
    rng = np.random.default_rng(seed)
    calls = {}
    for name, model in models.items():
        shape = (batch_size,) + tuple(model.input_shape[1:])
        x = rng.random(shape, dtype=np.float32)
        for _ in range(warmup):
            model.predict_on_batch(x)
        calls[name] = (lambda m=model, x=x: m.predict_on_batch(x))
    return _median_alternating(calls, repeats, number)


def to_tflite(model, path, representative=None):
    """Convert `model` (TensorFlow backend) to a `.tflite` file at `path`.

    Goes through Keras' own SavedModel export (`model.export`), the route
    Keras 3 documents for TFLite. Float32 by default; with `representative`
    (an array of inputs, a few hundred training images) the weights and
    activations are quantized to int8 (inputs and outputs stay float32).
    Returns the file size in KiB.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as saved:
        model.export(saved, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if representative is not None:
            samples = np.asarray(representative, np.float32)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([row[None]] for row in samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return os.path.getsize(path) / 1024


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def _interpreter(path, threads):
    interpreter = _interpreter_class()(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def tflite_predict(path, x, threads=2):
    """Outputs of the `.tflite` model at `path` on `x`, one example at a time."""
    interpreter = _interpreter(path, threads)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    outputs = []
    for row in np.asarray(x, np.float32):
        interpreter.set_tensor(inp, row[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out)[0].copy())
    return np.stack(outputs)


def tflite_latency(paths, repeats=15, number=20, warmup=5, threads=2, seed=0):
    """Median ms per batch-1 `invoke` in the TFLite interpreter, per `.tflite` path.

    `paths` maps names to files written by `to_tflite`. Returns `{name: ms}`.
    """
    rng = np.random.default_rng(seed)
    calls = {}
    for name, path in paths.items():
        interpreter = _interpreter(path, threads)
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"],
                               rng.random(detail["shape"], dtype=np.float32))
        for _ in range(warmup):
            interpreter.invoke()
        calls[name] = interpreter.invoke
    return _median_alternating(calls, repeats, number)
