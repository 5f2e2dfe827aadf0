"""`fold(model)`: a shallower model with the same outputs, checked.

Every fold checks itself: the folded model runs next to the user's model
on probe batches and any output off by more than `tolerance` times the
largest output of its batch, or NaN, counts as a failure. The probes are
several batches (`probe_batches`): draws in each input's domain, and one
in its real range (that of a leading `Rescaling` or `Normalization`, or
of the caller's `verify=` batch, which is checked too). One small batch
at one scale once passed a fold whose error showed only on other inputs:
float32 rounding differs from input to input, and a bias map's share of
the output shrinks as the inputs grow. The decisions behind a failure
(activation removals, BatchNormalization folds, merges) are found by
bisection and undone, and the report lists them; if even the model without
any change disagrees, `fold` raises. A silent wrong answer needs a probe
batch on which the error does not show.
"""

import keras
import numpy as np

from tf_layersparse.cost import model_cost
from tf_layersparse.folding.plan import plan_fold, unmerged_batchnorm
from tf_layersparse.folding.rebuild import rebuild
from tf_layersparse.folding.report import FoldReport, LayerReport
from tf_layersparse.graph import model_graph

__all__ = ["compare_outputs", "fold", "input_ranges", "probe_batches", "probe_inputs"]

DEFAULT_TOLERANCE = 1e-5


def _embedding_vocabulary(model, index):
    """Smallest `input_dim` of the Embedding layers reading input `index`."""
    tensor = model.inputs[index]
    sizes = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Embedding):
            for node in getattr(layer, "_inbound_nodes", []):
                if any(t is tensor for t in node.arguments.keras_tensors):
                    sizes.append(layer.input_dim)
    if isinstance(model, keras.Sequential) and isinstance(
            model.layers[0], keras.layers.Embedding):
        sizes.append(model.layers[0].input_dim)
    return min(sizes) if sizes else 10


def _masking_value(model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.Masking):
            return layer.mask_value
    return None


def probe_inputs(model, nonnegative_inputs=False, batch_size=8, seed=0, ranges=None):
    """Inputs drawn in each model input's domain, to check a fold on.

    Floats are standard normal (their absolute value for inputs declared
    non-negative), or uniform in `ranges[i]` (`(low, high)`, or None) for
    input `i` when given; integers are indices below the smallest vocabulary of an
    Embedding reading them (else below 10); booleans are fair coins. When
    the model has a `Masking` layer, the last two steps of every other
    sample are set to its mask value, so that masking is exercised.
    Unknown dimensions are 5.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> bool(probe_inputs(model, nonnegative_inputs=True).min() >= 0)
    True
    """
    rng = np.random.default_rng(seed)
    flags = nonnegative_inputs
    if not isinstance(flags, (list, tuple)):
        flags = [flags] * len(model.inputs)
    mask_value = _masking_value(model)
    ranges = ranges if ranges is not None else [None] * len(model.inputs)
    inputs = []
    for index, (tensor, flag) in enumerate(zip(model.inputs, flags)):
        shape = [batch_size] + [d if d is not None else 5 for d in tensor.shape[1:]]
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if dtype == "bool":
            x = rng.random(shape) < 0.5
        elif "int" in dtype:
            x = rng.integers(0, _embedding_vocabulary(model, index), shape)
        elif ranges[index] is not None:
            low, high = ranges[index]
            x = rng.uniform(max(low, 0.0) if flag else low, high, shape)
        else:
            x = rng.standard_normal(shape)
            x = np.abs(x) if flag else x
        if mask_value is not None and len(shape) >= 3 and x.dtype.kind == "f":
            x[::2, -2:] = mask_value
        inputs.append(x.astype(dtype))
    return inputs[0] if len(inputs) == 1 else inputs


def _first_reader(model, tensor):
    """The layer that reads `tensor` first, if exactly one does."""
    readers = [layer for layer in model.layers
               for node in getattr(layer, "_inbound_nodes", [])
               if any(t is tensor for t in node.arguments.keras_tensors)]
    return readers[0] if len(readers) == 1 else None


def _preprocessing_range(layer):
    """The inputs' range implied by a preprocessing layer, or None:
    `Rescaling` is taken to map its inputs onto [0, 1] (no offset) or
    [-1, 1] (an offset), as for pixels; `Normalization` onto about
    [-3, 3] standard deviations."""
    if isinstance(layer, keras.layers.Rescaling):
        scale = np.asarray(layer.scale, np.float64)
        offset = np.asarray(layer.offset, np.float64)
        if scale.size != 1 or offset.size != 1 or float(scale) == 0:
            return None
        scale, offset = float(scale), float(offset)
        target = (0.0, 1.0) if offset == 0 else (-1.0, 1.0)
        ends = sorted((t - offset) / scale for t in target)
        return float(ends[0]), float(ends[1])
    if isinstance(layer, keras.layers.Normalization) and layer.built and not layer.invert:
        mean = keras.ops.convert_to_numpy(layer.mean).astype(np.float64)
        std = np.sqrt(keras.ops.convert_to_numpy(layer.variance).astype(np.float64))
        return float(np.min(mean - 3 * std)), float(np.max(mean + 3 * std))
    return None


def input_ranges(model):
    """Per model input, the `(low, high)` range its values live in, read
    from the preprocessing layer that reads it (`Rescaling`,
    `Normalization`), else None.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Rescaling(1 / 255)])
    >>> [tuple(round(v) for v in r) for r in input_ranges(model)]
    [(0, 255)]
    """
    ranges = []
    for index, tensor in enumerate(model.inputs):
        if isinstance(model, keras.Sequential) and index == 0 and model.layers:
            reader = model.layers[0]
        else:
            reader = _first_reader(model, tensor)
        ranges.append(None if reader is None else _preprocessing_range(reader))
    return ranges


def _batch_range(x):
    """`(low, high)` of a float array with finite values, else None."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.size == 0 or not np.all(np.isfinite(x)):
        return None
    return float(x.min()), float(x.max())


def probe_batches(model, nonnegative_inputs=False, batch_size=4, seed=0, data=None):
    """Batches to check a fold on, each judged on its own.

    Two draws of `batch_size` in each input's domain (`probe_inputs`) and
    one uniform in its real range: that of `data` (a batch the caller
    gave, which comes first) or of the preprocessing layer reading the
    input (`input_ranges`), else [-1, 1] ([0, 1] for non-negative
    inputs). The check runs them as one batch, so the draws are small: on
    a ResNet the check's forward passes are most of a fold's time.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Rescaling(1 / 255)])
    >>> batches = probe_batches(model, nonnegative_inputs=True)
    >>> len(batches), bool(batches[2].max() > 100)
    (3, True)
    """
    ranges = input_ranges(model)
    batches = []
    if data is not None:
        data = keras.tree.map_structure(keras.ops.convert_to_numpy, data)
        data = list(data) if isinstance(data, tuple) else data
        flat = keras.tree.flatten(data)
        if len(flat) != len(model.inputs) or (len(flat) > 1 and not isinstance(data, list)):
            return [data]  # named inputs: no draws of the same structure
        given = [_batch_range(x) for x in flat]
        ranges = [g if g is not None else r for g, r in zip(given, ranges)]
        batches.append(data)
    ranges = [r if r is not None else (-1.0, 1.0) for r in ranges]
    draws = [probe_inputs(model, nonnegative_inputs, batch_size, seed + offset)
             for offset in range(2)]
    draws.append(probe_inputs(model, nonnegative_inputs, batch_size, seed + 2, ranges))
    if data is not None:  # a size the model leaves open may differ from the draws' 5
        shapes = [np.shape(x)[1:] for x in keras.tree.flatten(data)]
        draws = [d for d in draws
                 if [np.shape(x)[1:] for x in keras.tree.flatten(d)] == shapes]
    return batches + draws


# XLA options for the check's one-off compiles on JAX: the unoptimised code
# paths compile several times faster, and the check runs once
_JAX_CHECK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True}


def _call_jax(models, inputs):
    """The outputs of each model on JAX, from one compiled function.

    Eager JAX compiles every operation anew for each new shape, and a
    folded model has new shapes: one compile of all the models together
    (with XLA's cheap options) costs a fraction of that. Models that cannot
    be traced run eagerly.
    """
    import jax

    states = [([v.value for v in m.trainable_variables],
               [v.value for v in m.non_trainable_variables]) for m in models]

    def forward(states, x):
        return [m.stateless_call(*state, x, training=False)[0]
                for m, state in zip(models, states)]

    try:
        compiled = jax.jit(forward, compiler_options=_JAX_CHECK_COMPILER_OPTIONS)
    except TypeError:  # a JAX without `compiler_options`
        compiled = jax.jit(forward)
    try:
        return compiled(states, inputs)
    except Exception:  # noqa: BLE001 - not traceable (or options unknown): run eagerly
        return [m(inputs, training=False) for m in models]


def _call(model, inputs):
    try:
        return model(inputs, training=False)
    except Exception as error:  # noqa: BLE001 - retried compiled, else explained
        if keras.backend.backend() != "tensorflow":
            raise
        # TensorFlow runs some ops (channels_first convolutions) on CPU only
        # when compiled with XLA
        import tensorflow as tf

        try:
            return tf.function(lambda x: model(x, training=False), jit_compile=True)(inputs)
        except Exception:  # noqa: BLE001
            raise ValueError(
                f"fold's self-check cannot run model '{model.name}' on this device "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); pass "
                "verify=False to fold without it.") from error


def _outputs(models, inputs):
    """For each model, its outputs on `inputs` as a list of float64 arrays."""
    if keras.backend.backend() == "jax":
        results = _call_jax(models, inputs)
    else:
        results = [_call(m, inputs) for m in models]
    return [[keras.ops.convert_to_numpy(y).astype(np.float64) for y in keras.tree.flatten(r)]
            for r in results]


def _errors(expected, actual, names, rows=None):
    """`{name: (abs, rel)}`; with `rows` (row slices, one per probe batch),
    each batch is judged against its own largest output and the worst
    batch counts."""
    if rows is not None:
        worst = {}
        for part in rows:
            if not all(a.ndim and a.shape[0] == rows[-1].stop for a in expected + actual):
                return _errors(expected, actual, names)  # outputs without a batch axis
            errors = _errors([a[part] for a in expected], [b[part] for b in actual], names)
            for name, (abs_err, rel) in errors.items():
                old = worst.get(name, (0.0, 0.0))
                worst[name] = (max(old[0], abs_err), max(old[1], rel))
        return worst
    result = {}
    for name, a, b in zip(names, expected, actual):
        if a.shape != b.shape:
            result[name] = (float("inf"), float("inf"))
            continue
        diff = np.abs(a - b)
        # NaN or inf where the original is finite is a failure, never a pass
        bad = ~np.isfinite(b) & np.isfinite(a)
        abs_err = float("inf") if bad.any() else float(np.nan_to_num(diff, nan=0.0).max(initial=0))
        scale = float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
        result[name] = (abs_err, abs_err / scale if scale > 0 else abs_err)
    return result


def _output_names(model):
    return [t._keras_history.operation.name for t in keras.tree.flatten(model.outputs)]


def compare_outputs(reference, candidate, inputs):
    """Max absolute and relative output error of `candidate` vs `reference`.

    Returns `{output name: (max_abs_error, max_rel_error)}`; the relative
    error is the largest absolute error over the largest absolute reference
    output, so outputs near zero do not make it meaningless. A NaN or inf
    in `candidate` where `reference` is finite gives an infinite error.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> compare_outputs(m, m, np.ones((4, 2), "float32"))["d"]
    (0.0, 0.0)
    """
    expected, actual = _outputs([reference, candidate], inputs)
    return _errors(expected, actual, _output_names(reference))


def _stacked(batches):
    """The probe batches as one (so each model runs, and on JAX compiles,
    once) and the row slice of each; sizes may differ."""
    stacked = keras.tree.map_structure(lambda *xs: np.concatenate(xs, axis=0), *batches)
    sizes = [int(np.shape(keras.tree.flatten(b)[0])[0]) for b in batches]
    ends = np.cumsum(sizes).tolist()
    return stacked, [slice(end - n, end) for n, end in zip(sizes, ends)]


class _Checker:
    """Builds folded models for sets of allowed decisions and checks them
    against the original outputs on the probe batches."""

    def __init__(self, model, batches, tolerance, plan_kwargs):
        self.model, self.tolerance = model, tolerance
        self.inputs, self.rows = _stacked(batches)
        self.plan_kwargs = plan_kwargs
        self.expected = None  # the original's outputs, with the first fold's
        self.names = _output_names(model)

    def build(self, allowed=None):
        plan = plan_fold(self.model, allowed=allowed, **self.plan_kwargs)
        return plan, rebuild(plan)

    def errors(self, folded):
        if self.expected is None:
            self.expected, actual = _outputs([self.model, folded], self.inputs)
        else:
            (actual,) = _outputs([folded], self.inputs)
        return _errors(self.expected, actual, self.names, self.rows)

    def ok(self, errors):
        return all(rel <= self.tolerance for _, rel in errors.values())

    def passes(self, allowed_set):
        plan, folded = self.build(lambda d: d in allowed_set)
        return self.ok(self.errors(folded))


def _bisect(checker, decisions):
    """Decisions that can stay: add them in chunks, split chunks that fail."""
    allowed, reverted = set(), []
    pending = [list(decisions)]
    while pending:
        chunk = pending.pop(0)
        if checker.passes(allowed | set(chunk)):
            allowed |= set(chunk)
        elif len(chunk) == 1:
            reverted.append(chunk[0])
        else:
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
    return allowed, reverted


def _self_checked(model, batches, tolerance, plan_kwargs):
    checker = _Checker(model, batches, tolerance, plan_kwargs)
    plan, folded = checker.build()
    errors = checker.errors(folded)
    if checker.ok(errors):
        return plan, folded, errors, []
    if not checker.passes(set()):
        _, bare = checker.build(lambda d: False)
        worst = max(checker.errors(bare).items(), key=lambda kv: kv[1][1])
        raise ValueError(
            f"fold cannot reproduce model '{model.name}' even without merging anything: "
            f"output '{worst[0]}' differs by relative {worst[1][1]:.3g} after carrying its "
            "layers over (a layer whose state is not in its weights and config?).")
    allowed, reverted = _bisect(checker, plan.decisions)
    plan, folded = checker.build(lambda d: d in allowed)
    return plan, folded, checker.errors(folded), reverted


def fold(model, *, nonnegative_inputs=False, policy="cost", approximate=False,
         keep_batchnorm=False, verify=None, tolerance=None, return_report=False):
    """Return a new model with every inactive layer merged into the next.

    A layer is inactive when its input is >= 0 (it follows a ReLU, or it
    reads a model input declared non-negative), its kernel and bias (the
    effective ones of a Conv -> BatchNormalization block) have no negative
    entry, and its activation is the identity on [0, inf) (relu,
    leaky_relu, elu, PReLU; not a capped relu6): the activation is then the
    identity on the values it sees, so the layer merges into the following
    affine layer exactly. Identities at inference (Dropout, ...) are
    dropped, BatchNormalization folds into the layer before it, linear
    layers merge, and an `Add` of a layer and its own input becomes one
    layer (RepVGG). Everything else is carried over unchanged.

    Args:
        model: a built Sequential or Functional model; it is not modified.
        nonnegative_inputs: True (or one flag per input) if the model's
            inputs are >= 0 (pixels, counts); makes the first layer foldable.
        policy: "cost" (default) merges only where parameters and FLOPs do
            not grow, judging each chain of merges as a whole; "depth"
            merges every inactive layer it can merge exactly.
        approximate: also merge 'same'-padded stride-1 convolutions, which
            differ from the original at the borders; the report lists these
            merges and their measured error (`approximate_error`).
        keep_batchnorm: keep each BatchNormalization whose block is not
            merged into a later layer (only the inactive blocks' BN is
            folded): the condensed architecture to retrain, as `refit`
            does, rather than the fastest one for inference.
        verify: None (default) checks the fold on probe batches drawn in
            the inputs' domains and real ranges (also "random"); a batch of
            inputs checks it on those and on draws in their range; False
            skips the check.
        tolerance: largest relative output error (of the largest output)
            the self-check accepts; 1e-5 by default. Given explicitly, it
            also bounds the error of `approximate` merges (else ValueError).
        return_report: also return a `FoldReport`.

    Returns:
        The folded `keras.Model` (Sequential in, Sequential out), or
        `(model, report)` if `return_report`.

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, activation="relu"),
    ...     keras.layers.Dense(8, activation="relu", kernel_initializer="ones"),
    ...     keras.layers.Dense(1)])
    >>> folded, report = ls.fold(model, return_report=True)
    >>> len(folded.layers), report.max_relative_error < 1e-5
    (2, True)
    """
    model_graph(model)  # a clear TypeError/ValueError for models fold cannot read
    explicit_tolerance = tolerance is not None
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    plan_kwargs = dict(nonnegative_inputs=nonnegative_inputs, policy=policy)
    if keep_batchnorm:
        plan_kwargs["forbidden"] = unmerged_batchnorm(model, approximate=approximate,
                                                      **plan_kwargs)
    reverted, verification, approximate_error = [], None, None
    if verify is False:
        plan = plan_fold(model, approximate=approximate, **plan_kwargs)
        folded = rebuild(plan)
    else:
        data = None if verify is None or (isinstance(verify, str) and verify == "random") else (
            verify)
        batches = probe_batches(model, nonnegative_inputs, data=data)
        plan, folded, verification, reverted = _self_checked(
            model, batches, tolerance, plan_kwargs)
        if approximate:
            allowed = set(plan.decisions)
            exact_merges = {d for d in allowed if d[0] == "merge"}
            plan = plan_fold(model, approximate=True, **plan_kwargs,
                             allowed=lambda d: d in allowed or d[0] == "merge"
                             and d not in exact_merges and d not in reverted)
            folded = rebuild(plan)
            inputs, rows = _stacked(batches)
            expected, actual = _outputs([model, folded], inputs)
            verification = _errors(expected, actual, _output_names(model), rows)
            approximate_error = max(rel for _, rel in verification.values())
            if explicit_tolerance and approximate_error > tolerance:
                raise ValueError(
                    f"Approximate merges ({', '.join(plan.approximate)}) change the outputs "
                    f"of '{model.name}' by relative {approximate_error:.3g} > tolerance "
                    f"{tolerance:.3g}.")
    report = FoldReport(
        layers=LayerReport(plan.statuses.values()), merges=plan.merges,
        skipped=plan.skipped, before=model_cost(model), after=model_cost(folded),
        verification=verification, approximate=plan.approximate, reverted=reverted,
        approximate_error=approximate_error if plan.approximate else None,
        routes=dict(plan.routes))
    return (folded, report) if return_report else folded
