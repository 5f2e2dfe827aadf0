"""Fold real Keras models and print what it costs and gains.

The models are the zoo of `tests/zoo.py` (the tests fold the same ones):
the `keras.applications` convnets with weights=None, LSTM/GRU behind
`Masking`, and small graphs that once broke `fold`, each with random weights
("random") and with weights that make every ReLU an identity ("identities").

For each model and variant the table gives the fold wall time, FLOPs and
parameters before/after (`model_cost`, and FLOPs counted by the backend's own
compiler: TensorFlow's profiler or XLA's cost analysis), the max relative
error of the folded model (max |difference| / max |original output|, NaN
counted as inf), and the compiled inference latency at batch 1 and 64
(median over runs alternating original and folded in this process, after
warm-up) with the folded/original ratio.

`--fold-times` prints only what `fold` costs, for every model of
`keras.applications` (weights=None) at 64x64 (its smallest input where that
is larger), both variants, default policy, self-check included: wall
and CPU seconds (this process's, all threads: on a shared machine the wall
time also counts other processes' turns), and the same fold again (what a
second fold of a model that size costs once Keras and the backend are warm). `--small-graphs N` prints the
median time `fold` takes on N random small graphs (those of
`tests/test_fold_dags.py`), with and without the self-check, on the
current backend.

Usage:
    python benchmarks/fold_zoo.py            # every model, both policies
    python benchmarks/fold_zoo.py --quick    # a fast subset, fewer runs
    python benchmarks/fold_zoo.py --models ResNet50 --variants identities
    python benchmarks/fold_zoo.py --fold-times [--models NASNetMobile ResNet50]
    KERAS_BACKEND=jax python benchmarks/fold_zoo.py --small-graphs 20

Backend: KERAS_BACKEND=tensorflow (default) or jax; latency uses
`tf.function` or `jax.jit` respectively.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

# the models live with the tests that fold them (tests/zoo.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from zoo import (  # noqa: E402
    APPLICATIONS,
    ZOO,
    available,
    backend_flops,
    build,
    inputs_for,
    make_identities,
    randomize_batchnorm,
    relative_error,
)

__all__ = [
    "APPLICATIONS",
    "ZOO",
    "application_names",
    "build_application",
    "fold_times",
    "latency",
    "small_graph_times",
    "main",
]

A = keras.applications


def _compiled(model, xla=False):
    """A compiled inference function of the model for this backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                           jit_compile=xla)
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])
        call = jax.jit(lambda s, x: model.stateless_call(s[0], s[1], x, training=False)[0])
        return lambda x: call(state, x)
    import torch

    def run(x):
        with torch.no_grad():
            return model(x, training=False)

    return run


def _block(y):
    for t in keras.tree.flatten(y):
        if hasattr(t, "block_until_ready"):
            t.block_until_ready()
        else:
            keras.ops.convert_to_numpy(t)


def latency(models, x, repeats=15, warmup=3, xla=False):
    """Median seconds per call for each model, runs alternating between them.

    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> len(latency([m, m], np.ones((1, 2), "float32"), repeats=2, warmup=1))
    2
    """
    calls = [_compiled(m, xla) for m in models]
    for _ in range(warmup):
        for call in calls:
            _block(call(x))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, acc in zip(calls, times):
            start = time.perf_counter()
            _block(call(x))
            acc.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def _fold(model, policy, nonnegative):
    import tf_layersparse as ls

    kwargs = {} if policy == "default" else {"policy": policy}
    start = time.perf_counter()
    folded = ls.fold(model, nonnegative_inputs=nonnegative, **kwargs)
    return folded, time.perf_counter() - start


def _row(name, variant, policy, repeats, batches):
    import tf_layersparse as ls

    model = build(name, variant)
    nonnegative = variant == "identities"
    try:
        folded, seconds = _fold(model, policy, nonnegative)
    except Exception as error:  # the table reports crashes instead of stopping
        return dict(model=name, variant=variant, policy=policy,
                    error=f"{type(error).__name__}: {' '.join(str(error).split())[:160]}")
    x = inputs_for(name, variant, 8, seed=1)
    before, after = ls.model_cost(model), ls.model_cost(folded)
    x1 = inputs_for(name, variant, 1, seed=2)
    row = dict(
        model=name, variant=variant, policy=policy, fold_s=seconds,
        depth=(before.depth, after.depth),
        params=(before.params, after.params), flops=(before.flops, after.flops),
        backend_flops=(backend_flops(model, x1), backend_flops(folded, x1)),
        rel_error=relative_error(model, folded, x, ZOO[name].xla),
    )
    for batch in batches:
        xb = inputs_for(name, variant, batch, seed=3)
        t_orig, t_fold = latency([model, folded], xb, repeats=repeats, xla=ZOO[name].xla)
        row[f"lat{batch}"] = (t_orig, t_fold)
    return row


def _fmt_pair(pair, scale=1.0, digits=0):
    a, b = pair
    if a is None or b is None:
        return "n/a"
    ratio = b / a if a else float("nan")
    return f"{a / scale:,.{digits}f} -> {b / scale:,.{digits}f} (x{ratio:.2f})"


def _print_row(row, batches):
    head = f"| {row['model']} | {row['variant']} | {row['policy']} |"
    if "error" in row:
        print(head + f" FAILED: {row['error']} |", flush=True)
        return
    cells = [
        f"{row['fold_s']:.2f}",
        f"{row['depth'][0]} -> {row['depth'][1]}",
        _fmt_pair(row["params"]),
        _fmt_pair(row["flops"], 1e6, 2),
        _fmt_pair(row["backend_flops"], 1e6, 2),
        f"{row['rel_error']:.2e}",
    ] + [_fmt_pair(row[f"lat{b}"], 1e-3, 3) for b in batches]
    print(head + " " + " | ".join(cells) + " |", flush=True)


# smallest input side of the applications that take no 64x64 input
_MIN_SIDE = {"Xception": 71, "InceptionV3": 75, "InceptionResNetV2": 75}
FOLD_TIME_TARGET, RESNET50_TARGET = 5.0, 2.0


def application_names():
    """Every model builder in `keras.applications`."""
    return sorted(n for n in dir(A) if n[0].isupper() and callable(getattr(A, n)))


def build_application(name, variant, side=64, seed=0):
    """`keras.applications.<name>` with weights=None at `side` x `side` (or its
    smallest input), weights set for `variant` as in `build`."""
    keras.utils.set_random_seed(seed)
    side = max(side, _MIN_SIDE.get(name, 0))
    kwargs = dict(weights=None, input_shape=(side, side, 3), classes=5)
    try:
        model = getattr(A, name)(classifier_activation=None, **kwargs)
    except TypeError:  # a builder without classifier_activation
        model = getattr(A, name)(**kwargs)
    if variant == "identities":
        make_identities(model, seed)
    else:
        randomize_batchnorm(model, seed)
    return model, side


def fold_times(names, variants, side=64):
    """Print the fold wall time of each application model; returns the
    number of folds over the targets or off by more than 1e-5."""
    import tf_layersparse as ls

    print(f"backend {keras.backend.backend()}, {os.cpu_count()} CPUs; fold with the "
          f"self-check, default policy; load average at start {os.getloadavg()[0]:.1f}")
    print("| model | input | variant | fold s | CPU s | again s | again CPU s | affine layers "
          "| max rel err | reverted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    over, slowest = 0, (0.0, "")
    for name in names:
        for variant in variants:
            model, size = build_application(name, variant, side)
            seconds, cpu, report = [], [], None
            for _ in range(2):
                start, start_cpu = time.perf_counter(), time.process_time()
                _, report = ls.fold(model, nonnegative_inputs=variant == "identities",
                                    return_report=True)
                seconds.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            target = RESNET50_TARGET if name == "ResNet50" else FOLD_TIME_TARGET
            bad = seconds[0] > target or report.max_relative_error > 1e-5
            over += bad
            slowest = max(slowest, (seconds[0], f"{name} {variant}"))
            print(f"| {name} | {size} | {variant} | {seconds[0]:.2f}{' (over)' if bad else ''} "
                  f"| {cpu[0]:.2f} | {seconds[1]:.2f} | {cpu[1]:.2f} "
                  f"| {report.before.depth} -> {report.after.depth} "
                  f"| {report.max_relative_error:.1e} | {len(report.reverted)} |", flush=True)
            del model
            keras.backend.clear_session()
    print(f"slowest: {slowest[1]}, {slowest[0]:.2f} s; {over} fold(s) over "
          f"{FOLD_TIME_TARGET:g} s (ResNet50: {RESNET50_TARGET:g} s) or off by more than 1e-5; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return over


def small_graph_times(count=20):
    """Fold the first `count` random graphs of `tests/test_fold_dags.py`
    (fixed draws) as that test does, timing each default fold with and
    without the self-check; prints and returns the median seconds."""
    import hypothesis
    import test_fold_dags as dags

    import tf_layersparse as ls

    specs = []

    @hypothesis.settings(max_examples=count, derandomize=True, database=None, deadline=None,
                         phases=[hypothesis.Phase.generate])
    @hypothesis.given(dags.dags())
    def collect(spec):
        specs.append(spec)

    collect()
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    for spec in specs[:count]:
        model = dags.build(spec)
        for verify in (True, False):
            start, start_cpu = time.perf_counter(), time.process_time()
            ls.fold(model, nonnegative_inputs=spec["nonnegative_input"],
                    verify=None if verify else False)
            times[verify].append(time.perf_counter() - start)
            cpu[verify].append(time.process_time() - start_cpu)
        keras.backend.clear_session()
    medians = {k: float(np.median(v)) for k, v in times.items()}
    print(f"backend {keras.backend.backend()}: {len(specs[:count])} random graphs of "
          f"tests/test_fold_dags.py, fold median {medians[True]:.3f} s with the self-check "
          f"(CPU {np.median(cpu[True]):.3f} s; max {max(times[True]):.3f} s), "
          f"{medians[False]:.3f} s without (CPU {np.median(cpu[False]):.3f} s); load average "
          f"{os.getloadavg()[0]:.1f}")
    return medians


QUICK = ("ResNet50", "MobileNetV2", "MobileNetV3Small", "raw_ops", "normalization",
         "upsampling_bicubic", "spatial_axis_bn", "channels_first_bn", "LSTM_masking")


def main(argv=None):
    """Print the fold table for the zoo (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(QUICK)}; default policy; 5 latency runs")
    parser.add_argument("--models", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--variants", nargs="*", default=["random", "identities"])
    parser.add_argument("--policies", nargs="*", default=None,
                        help='fold policies; "default" is fold() without policy= '
                             '(default: default and depth; --quick: default)')
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--fold-times", action="store_true",
                        help="only fold times, of every keras.applications model at 64x64 "
                             "(or --models of them)")
    parser.add_argument("--small-graphs", type=int, default=None, metavar="N",
                        help="only the median fold time of N random small graphs (the "
                             "DAG tests' draws), with and without the self-check")
    args = parser.parse_args(argv)
    if args.small_graphs:
        small_graph_times(args.small_graphs)
        return 0
    if args.fold_times:
        names = args.models or application_names()
        unknown = [n for n in names if n not in application_names()]
        if unknown:
            parser.error(f"unknown applications {unknown}; choose from {application_names()}")
        return 1 if fold_times(names, args.variants) else 0
    names = [n for n in args.models or (QUICK if args.quick else ZOO) if n not in ZOO or available(n)]
    policies = args.policies or (["default"] if args.quick else ["default", "depth"])
    repeats = args.repeats or (5 if args.quick else 21)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(ZOO)}")
    print(f"backend {keras.backend.backend()}, {os.cpu_count()} CPUs, "
          f"latency = median of {repeats} alternating runs after warm-up")
    print("| model | variant | policy | fold s | affine layers | params | MFLOPs (model_cost) "
          "| MFLOPs (backend) | max rel err | "
          + " | ".join(f"latency ms b{b}" for b in args.batches) + " |")
    print("|" + "---|" * (9 + len(args.batches)))
    failures = 0
    resnet = []
    for name in names:
        for variant in args.variants:
            for policy in policies:
                row = _row(name, variant, policy, repeats, args.batches)
                failures += "error" in row or row["rel_error"] > 1e-5
                _print_row(row, args.batches)
                if name == "ResNet50" and "fold_s" in row:
                    resnet.append(f"{variant}/{policy} {row['fold_s']:.2f} s")
                keras.backend.clear_session()
    if resnet:
        print(f"ResNet50 at 64x64, fold wall time (target < 2 s): {', '.join(resnet)}")
    print(f"{failures} row(s) failed (crash or max rel error > 1e-5)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
