"""Fold inactive layers away: `fold(model)` returns a shallower, equal model."""

import dataclasses
from typing import Optional

import keras
import numpy as np

from tf_layersparse.cost import ModelCost, model_cost
from tf_layersparse.folding.eligibility import Eligibility, eligible_layers
from tf_layersparse.folding.plan import LayerReport, LayerStatus, plan_fold
from tf_layersparse.folding.rebuild import rebuild

__all__ = [
    "Eligibility",
    "FoldReport",
    "LayerStatus",
    "compare_outputs",
    "eligible_layers",
    "fold",
    "plan_fold",
]


@dataclasses.dataclass
class FoldReport:
    """What `fold` did: per-layer statuses, merges, sizes, measured error.

    `verification` maps each output name to `(max_abs_error,
    max_rel_error)`, the relative error being the largest absolute error
    divided by the largest absolute output of the original model.
    """

    layers: list  # LayerStatus for every layer of the original model
    merges: list  # (kept layer name, [names of the layers merged into it])
    skipped: list  # (first, second, reason) of merges not made
    before: ModelCost
    after: ModelCost
    verification: Optional[dict] = None
    approximate: list = dataclasses.field(default_factory=list)

    @property
    def exact(self):
        """False if any merge is only approximate ('same' padding borders)."""
        return not self.approximate

    @property
    def max_relative_error(self):
        if not self.verification:
            return None
        return max(rel for _, rel in self.verification.values())

    def __str__(self):
        lines = [f"before: {self.before}", f"after:  {self.after}"]
        if self.merges:
            lines.append("merges:")
            for target, members in self.merges:
                lines.append(f"  {' + '.join(members)} -> {target}")
        lines.append(str(LayerReport(self.layers)))
        if self.approximate:
            lines.append("approximate merges ('same' borders): " + ", ".join(self.approximate))
        if self.verification:
            for name, (abs_err, rel_err) in self.verification.items():
                lines.append(
                    f"check {name}: max abs error {abs_err:.3g}, "
                    f"max rel error {rel_err:.3g}"
                )
        return "\n".join(lines)


def _random_inputs(model, nonnegative_inputs, batch_size=64, seed=0):
    rng = np.random.default_rng(seed)
    flags = nonnegative_inputs
    if not isinstance(flags, (list, tuple)):
        flags = [flags] * len(model.inputs)
    inputs = []
    for tensor, flag in zip(model.inputs, flags):
        shape = [batch_size] + [d if d is not None else 8 for d in tensor.shape[1:]]
        x = rng.standard_normal(shape)
        inputs.append((np.abs(x) if flag else x).astype(tensor.dtype))
    return inputs[0] if len(inputs) == 1 else inputs


def compare_outputs(reference, candidate, inputs):
    """Max absolute and relative output error of `candidate` vs `reference`.

    Returns `{output name: (max_abs_error, max_rel_error)}`; the relative
    error is the largest absolute error over the largest absolute reference
    output, so outputs near zero do not make it meaningless.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> compare_outputs(m, m, np.ones((4, 2), "float32"))["d"]
    (0.0, 0.0)
    """
    expected = keras.tree.flatten(reference(inputs, training=False))
    actual = keras.tree.flatten(candidate(inputs, training=False))
    names = [t._keras_history.operation.name for t in keras.tree.flatten(reference.outputs)]
    result = {}
    for name, a, b in zip(names, expected, actual):
        a = keras.ops.convert_to_numpy(a).astype(np.float64)
        b = keras.ops.convert_to_numpy(b).astype(np.float64)
        abs_err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        result[name] = (abs_err, abs_err / scale if scale > 0 else abs_err)
    return result


def fold(
    model,
    *,
    nonnegative_inputs=False,
    policy="depth",
    approximate=False,
    verify=None,
    tolerance=None,
    return_report=False,
):
    """Return a new model with every inactive layer merged into the next.

    A layer is inactive when its input is >= 0 (it follows a ReLU, or it
    reads a model input declared non-negative), its kernel and bias have no
    negative entry, and its activation is the identity on [0, inf) (relu,
    leaky_relu, elu, PReLU): its activation is then the identity on the
    values it sees, so it merges into the following affine layer exactly
    (Dense: `K = K_a @ K_b`, `b = b_a @ K_b + b_b`). Identities at inference
    (Dropout, GaussianNoise, ...) are dropped; linear layers merge too.
    Layers it cannot fold stay as they are, with the reason in the report.

    Args:
        model: a built Sequential or Functional model; it is not modified.
        nonnegative_inputs: True (or one flag per input) if the model's
            inputs are >= 0 (pixels, counts); makes the first layer foldable.
        policy: "depth" merges every inactive layer it can merge exactly;
            "cost" only where parameters and FLOPs do not grow.
        approximate: also merge 'same'-padded stride-1 convolutions, which
            differ from the original at the borders; the report lists these
            merges and the measured error (`verify` defaults to "random").
        verify: None, "random" (inputs drawn from the stated domain) or a
            batch of inputs on which to compare folded and original outputs.
        tolerance: with `verify`, raise `ValueError` if the max relative
            error exceeds it.
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
    >>> folded, report = ls.fold(model, verify="random", return_report=True)
    >>> len(folded.layers), report.max_relative_error < 1e-5
    (2, True)
    """
    plan = plan_fold(model, nonnegative_inputs=nonnegative_inputs, policy=policy,
                     approximate=approximate)
    if verify is None and (tolerance is not None or plan.approximate):
        verify = "random"
    folded = rebuild(plan)
    report = FoldReport(
        layers=LayerReport(plan.statuses.values()),
        merges=plan.merges,
        skipped=plan.skipped,
        before=model_cost(model),
        after=model_cost(folded),
        approximate=plan.approximate,
    )
    if verify is not None:
        inputs = (
            _random_inputs(model, nonnegative_inputs)
            if isinstance(verify, str) and verify == "random"
            else verify
        )
        report.verification = compare_outputs(model, folded, inputs)
        if tolerance is not None and report.max_relative_error > tolerance:
            worst = max(report.verification, key=lambda k: report.verification[k][1])
            raise ValueError(
                f"Folded model differs from '{model.name}' at output '{worst}': "
                f"max relative error {report.verification[worst][1]:.3g} > "
                f"tolerance {tolerance:.3g}."
            )
    return (folded, report) if return_report else folded
