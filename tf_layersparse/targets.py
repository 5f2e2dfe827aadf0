"""Depth on demand: train until a given number of layers is inactive.

A `DepthTarget` asks for a number of inactive layers (or blocks), or for
a fraction of the model's FLOPs once folded, to be reached between two
steps of `fit`, as TFMOT's pruning schedules ask for a sparsity. Passed to
`ActiveLayers(target=...)`, it steers the penalty (see
`tf_layersparse.steering` for how): calibrated from the model itself, so
no starting strength is to be guessed; one layer at a time, each held
inactive (projected onto the non-negative set) once its negative part is
gone; and guarded by the training (and validation) loss. The strengths
live in one scalar variable per group that the compiled step reads, so
nothing retraces.

This module holds the request (`DepthTarget`), its report
(`TargetProgress`) and what the request is measured in: the FLOPs of the
model folding would build (`planned_flops`) and what removing each layer
saves (`removal_savings`).
"""

import dataclasses
import math
import warnings

import keras
import numpy as np

from tf_layersparse import registry
from tf_layersparse.cost import model_cost
from tf_layersparse.folding.plan import plan_fold

__all__ = ["DepthTarget", "TargetProgress", "planned_flops", "removal_savings"]

PULLS = ("focused", "all")


def _check_step(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0 or None, got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="tf_layersparse")
class DepthTarget:
    """How many layers to switch off, and by when.

    Give exactly one of `inactive` (a number of layers or blocks that
    end inactive, to be folded away) and `flops` (the fraction of the
    model's FLOPs, as `model_cost` counts them, that the folded model may
    keep). Steps count the optimizer updates of one `fit` call, from 0.

    The default schedule fits runs of any length: a warm-up without
    penalty until training has taken off (the smoothed training loss
    stands a fifth below its first level and falls less than half as fast
    as it did at its steepest, over a twentieth of the steps to the end
    step), half-way to the end step at the latest; the target due at half
    of the steps; and the second half to train with the held layers
    projected and every other layer free. With `wait_for_takeoff=False`
    the warm-up is a tenth of the steps instead. The step at which the
    pull began is logged as `pull_begin_step`.

    Args:
        inactive: integer >= 0; 0 trains without any penalty.
        flops: float in (0, 1].
        begin_step: the penalty starts here (plain training before);
            None: once training has taken off (see above and
            `wait_for_takeoff`; 0 when `fit` does not know its length).
        end_step: the target is due here, and no layer is held after it:
            a target not met by then ends with a warning saying what was
            reached and why (the layers not held keep their weights and
            train on without penalty); None: after half of the steps of
            `fit` (due at seven tenths instead, a deep MLP trained with
            SGD lost 5 to 37 more points of test accuracy over 3 seeds;
            docs/RESULTS.md).
        frequency: steps between two checks; None: about 200 checks
            between `begin_step` and `end_step`.
        growth: factor (> 1) by which the unitless pull multiplier grows at
            a check where the pulled layer is behind its schedule (and
            backs off while the loss keeps rising).
        max_new_holds: at most this many layers are newly held at one
            check, and as many are pulled at once (`pull="focused"`).
        tolerance: relative rise of the smoothed training loss (and of
            the validation loss, where `fit` has validation data) above
            its level when the current pull began at which the pull
            pauses; the next layer's pull waits until the loss is back
            within it. Near the end step the pull goes on above it, up to
            ten times it and half the way back to the untrained loss
            (`steering.HARD_LIMIT`, `steering.WRECK_SHARE`).
        pull: "focused" (default) pulls only `max_new_holds` layers at a
            time, the closest to inactive per unit of what removing them
            saves; "all" pulls every removable layer at once, each over
            the whole span, holding them one check at a time.
        rebase: when a held Dense layer feeds one Dense layer, hand its
            map to that layer and make it the identity (the outputs do not
            change), so that training goes on as in the folded model
            (see `steering.rebase_on_identity`).
        wait_for_takeoff: without `begin_step`, begin the pull once the
            training loss has taken off (see above); False: after a tenth
            of the steps. On the paper's MNIST MLP (10,000 images, 12
            epochs, target 5, TensorFlow, 3 seeds) plain SGD 0.05 ended
            within 1.01 points of its unpenalised net on average instead
            of 1.72, SGD with momentum and Adam(W) within noise of the
            tenth, every run with its 5 layers held by the end step
            (docs/RESULTS.md).

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    >>> y = np.maximum(x[:, :1], 0)
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu")(inputs)
    >>> for _ in range(4):
    ...     h = keras.layers.Dense(8, activation="relu",
    ...         kernel_regularizer=ls.LayerSparsity(0.01, group="layer"),
    ...         bias_regularizer=ls.LayerSparsity(0.01, group="layer"))(h)
    >>> model = keras.Model(inputs, keras.layers.Dense(1)(h))
    >>> model.compile(keras.optimizers.SGD(0.05), "mse")
    >>> callback = ls.ActiveLayers(target=ls.DepthTarget(inactive=2))
    >>> _ = model.fit(x, y, batch_size=16, epochs=8, verbose=0, callbacks=[callback])
    >>> callback.progress.inactive, callback.progress.reached
    (2, True)
    """

    def __init__(self, inactive=None, *, flops=None, begin_step=None, end_step=None,
                 frequency=None, growth=1.1, max_new_holds=1, tolerance=0.1,
                 pull="focused", rebase=True, wait_for_takeoff=True):
        if (inactive is None) == (flops is None):
            raise ValueError(
                "Give exactly one of `inactive` (a number of layers to switch off) "
                f"and `flops` (a fraction of the model's FLOPs); got inactive={inactive!r}, "
                f"flops={flops!r}.")
        if inactive is not None and (isinstance(inactive, bool) or not isinstance(
                inactive, (int, np.integer)) or inactive < 0):
            raise ValueError(f"`inactive` must be an integer >= 0, got {inactive!r}.")
        if flops is not None:
            if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not (
                    math.isfinite(flops) and 0 < flops <= 1):
                raise ValueError(f"`flops` must be a fraction in (0, 1], got {flops!r}.")
            flops = float(flops)
        self.inactive = None if inactive is None else int(inactive)
        self.flops = flops
        self.begin_step = _check_step(begin_step, "begin_step")
        self.end_step = _check_step(end_step, "end_step")
        if self.end_step is not None and self.end_step <= (self.begin_step or 0):
            raise ValueError(
                f"`begin_step` ({self.begin_step}) must come before `end_step` "
                f"({self.end_step}); move the end later or the begin earlier.")
        if frequency is not None:
            frequency = _check_step(frequency, "frequency")
            if frequency < 1:
                raise ValueError(f"`frequency` must be >= 1, got {frequency}.")
        self.frequency = frequency
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1):
            raise ValueError(f"`growth` must be a finite number > 1, got {growth!r}.")
        self.growth = float(growth)
        if isinstance(max_new_holds, bool) or not isinstance(
                max_new_holds, (int, np.integer)) or max_new_holds < 1:
            raise ValueError(f"`max_new_holds` must be an integer >= 1, got {max_new_holds!r}.")
        self.max_new_holds = int(max_new_holds)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
                math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"`tolerance` must be a finite number >= 0, got {tolerance!r}.")
        self.tolerance = float(tolerance)
        if pull not in PULLS:
            raise ValueError(f"`pull` must be one of {PULLS}, got {pull!r}.")
        self.pull = pull
        self.rebase = bool(rebase)
        self.wait_for_takeoff = bool(wait_for_takeoff)

    @property
    def is_zero(self):
        return self.inactive == 0

    def schedule(self, total_steps):
        """`(begin, end)` steps for a `fit` of `total_steps` (None: unknown).

        With `wait_for_takeoff` (and no `begin_step`), `begin` is the
        latest step at which the warm-up ends: half-way to the end step.

        Example:

        >>> DepthTarget(3).schedule(1000), DepthTarget(3, end_step=500).schedule(None)
        ((250, 500), (0, 500))
        >>> DepthTarget(3, wait_for_takeoff=False).schedule(1000)
        (100, 500)
        """
        begin, end = self.begin_step, self.end_step
        if end is None:
            if total_steps is None:
                raise ValueError(
                    "The number of steps of this fit is unknown (a dataset without a "
                    "length and no steps_per_epoch), so DepthTarget needs an explicit "
                    "`end_step`.")
            end = max(1, round(0.5 * total_steps))
        if begin is None and total_steps is None:
            begin = 0
        elif begin is None:  # with `wait_for_takeoff`, the latest begin of the warm-up
            begin = min(round(0.5 * end if self.wait_for_takeoff else 0.1 * total_steps),
                        end - 1)
        if end <= begin:
            raise ValueError(
                f"DepthTarget's `begin_step` ({begin}) must come before its end step "
                f"({end}, half of this fit's {total_steps} steps); give "
                "`end_step` or a smaller `begin_step`.")
        return begin, end

    def get_config(self):
        return {"inactive": self.inactive, "flops": self.flops, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency, "growth": self.growth,
                "max_new_holds": self.max_new_holds, "tolerance": self.tolerance,
                "pull": self.pull, "rebase": self.rebase,
                "wait_for_takeoff": self.wait_for_takeoff}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # a starting strength no longer exists: the pull is calibrated
        config.pop("initial_strength", None)
        return cls(config.pop("inactive", None), **config)

    def __repr__(self):
        wanted = (f"inactive={self.inactive}" if self.inactive is not None
                  else f"flops={self.flops}")
        return f"DepthTarget({wanted}, begin_step={self.begin_step}, end_step={self.end_step})"


@dataclasses.dataclass
class TargetProgress:
    """Where a depth target stands; `ActiveLayers.progress` after `fit`.

    `inactive`: layers held inactive; `held`: their names, in the order
    they were held; `flops_fraction`: FLOPs of the folded model (the held
    layers inactive) over the model's; `multiplier`: the unitless pull
    multiplier now; `reached`: whether the target is met; `removable`: the
    layers that can count towards it, with the FLOPs removing each saves;
    `guard`: "open", "paused" or "backing off" (see
    `tf_layersparse.steering`); `pulled`: the layers pulled now; `holds`:
    the step at which each held layer was held; `begin_step`: the step at
    which the pull began (None while warming up).

    Example:

    >>> progress = TargetProgress(DepthTarget(2), ["h1"], 0.8, 3.0, False, {"h1": 32, "h2": 32})
    >>> progress.inactive, str(progress)
    (1, 'target 2 inactive layers: 1 held (h1), 80.0% of the FLOPs once folded, multiplier 3, not reached')
    """

    target: DepthTarget
    held: list
    flops_fraction: float
    multiplier: float
    reached: bool
    removable: dict
    guard: str = "open"
    pulled: list = dataclasses.field(default_factory=list)
    holds: dict = dataclasses.field(default_factory=dict)
    begin_step: int = None

    @property
    def inactive(self):
        return len(self.held)

    def __str__(self):
        wanted = (f"{self.target.inactive} inactive layers" if self.target.inactive is not None
                  else f"at most {self.target.flops:.0%} of the FLOPs")
        return (f"target {wanted}: {self.inactive} held ({', '.join(self.held) or 'none'}), "
                f"{self.flops_fraction:.1%} of the FLOPs once folded, multiplier "
                f"{self.multiplier:.3g}, {'reached' if self.reached else 'not reached'}"
                + ("" if self.guard == "open" else f", guard {self.guard}"))


def planned_flops(plan):
    """FLOPs per example of the model `plan` (a `FoldPlan`) would build.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
    ...                           keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    >>> planned_flops(plan_fold(model)), planned_flops(plan_fold(model, assume_inactive={model.layers[1].name}))
    (72, 40)
    """
    total = 0
    for step in plan.kept:
        if step.kind == registry.AFFINE:
            segment = plan.segments.get(id(step))
            affine, last = (segment.affine, segment.last) if segment else (step.affine, step)
            steps = segment.steps if segment else (step,)
            with_bias = any(getattr(s.layer, "use_bias", False) or s.batchnorm is not None
                            for s in steps)
            total += affine.cost(last.node.shapes[0], with_bias)[1]
            if getattr(affine, "bias_map", None) is not None:  # a BiasMap: one add per output
                total += math.prod(d for d in last.node.shapes[0][1:] if d is not None)
        elif step.kind == registry.BATCHNORM:
            total += 2 * math.prod(d for d in step.node.shapes[0][1:] if d is not None)
    return int(total)


def removal_savings(model, names, nonnegative_inputs=False, policy="cost"):
    """`({name: FLOPs saved}, {name: reason})` for the penalised layers `names`.

    A layer's saving is the folded model's FLOPs with every layer of
    `names` inactive except it, minus the FLOPs with all of them inactive:
    what it costs to keep that one layer active. Layers that save nothing
    come back in the second dictionary with the reason.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,))]
    ...     + [keras.layers.Dense(4, activation="relu", name=f"h{i}") for i in range(3)]
    ...     + [keras.layers.Dense(2, name="out")])
    >>> removal_savings(model, ["h1", "h2"])
    ({'h1': 32, 'h2': 32}, {})
    """
    names = list(dict.fromkeys(names))
    everything = frozenset(names)
    plan = plan_fold(model, nonnegative_inputs=nonnegative_inputs, policy=policy,
                     assume_inactive=everything)
    floor = planned_flops(plan)
    savings, reasons = {}, {}
    for name in names:
        others = plan_fold(model, nonnegative_inputs=nonnegative_inputs, policy=policy,
                           assume_inactive=everything - {name}, assume_active={name})
        saved = planned_flops(others) - floor
        if saved > 0:
            savings[name] = saved
        else:
            reasons[name] = _why_kept(plan, name)
    return savings, reasons


def _why_kept(plan, name):
    for first, _, reason in plan.skipped:
        if first == name:
            return reason
    status = plan.statuses.get(name)
    if status is not None and status.action == "kept":
        return status.reason
    return "folding it saves no FLOPs under the cost policy"
