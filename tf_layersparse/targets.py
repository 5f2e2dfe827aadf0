"""Depth on demand: train until a given number of layers is inactive.

A `DepthTarget` asks for a number of inactive layers (or blocks), or for
a fraction of the model's FLOPs once folded, to be reached between two
steps of `fit`, as TFMOT's pruning schedules ask for a sparsity. Passed to
`ActiveLayers(target=...)`, it steers the penalty with three rules, all
taken on the host every `frequency` steps and read by the compiled step
from one scalar variable per group (no retracing):

- Continuation: every group's strength is its regularizer's strength
  times a multiplier that grows by `growth` at each check while fewer
  layers are inactive than the schedule allows, and shrinks by the same
  factor while more are (so that layers do not switch off in a crowd).
  The multiplier acts on the proximal threshold `learning rate x
  strength`: under a decaying learning-rate schedule the strength is
  divided by the decay so far (at most by 1000), so that the decay does
  not undo the continuation; with a constant rate nothing changes.
  The schedule allows `ceil(target * progress)` layers, `progress` going
  linearly from 0 at `begin_step` to 1 at `end_step`.
- Cost-aware pull: a layer's share of the strength is what removing it
  saves once folded (FLOPs, as `fold`'s cost policy would merge the
  layers of the model with every penalised layer inactive, minus the
  same with that layer active), divided by the mean over layers. A layer
  whose removal saves nothing (its merge would be refused) gets no pull
  and cannot count towards the target.
- Hold: an inactive layer counted towards the target is projected onto
  the non-negative set after every update (an infinite strength), so
  neither the data gradient nor moving statistics can switch it on again;
  once the target is met, the penalty on every other layer is released
  (strength 0) and they train freely.

Layers that switch off together beyond the allowance are not held; the
shrinking multiplier lets them switch on again. Which layers get held is
decided by the data (the first to become inactive), ties broken by the
pull.
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

HOLD_STRENGTH = 1e30  # a projection: every negative part is set to 0
PULLS = ("all", "focused")


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

    Args:
        inactive: integer >= 0; 0 trains without any penalty.
        flops: float in (0, 1].
        begin_step: the penalty starts here (plain training before).
        end_step: the target is due here; None: after three quarters of
            the steps of `fit`. The steps after it train the held layers
            projected and every other layer without penalty.
        frequency: steps between two checks of the inactive layers; None:
            about 100 checks between `begin_step` and `end_step`.
        growth: factor (> 1) of the strength multiplier per check.
        initial_strength: strength for groups whose regularizer has
            strength 0 (the multiplier scales each regularizer's strength).
        pull: "all" (default) pulls every removable layer at once, each by
            its share of the savings; "focused" (count targets) pulls only
            as many layers as the schedule still needs, those whose
            negative part is smallest (root mean square, per unit of
            saving), and leaves the rest unpenalised. See docs/RESULTS.md
            for how the two compare.

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

    def __init__(self, inactive=None, *, flops=None, begin_step=0, end_step=None,
                 frequency=None, growth=1.1, initial_strength=1e-3, pull="all"):
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
        if self.end_step is not None and self.end_step <= self.begin_step:
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
        if not (isinstance(initial_strength, (int, float)) and math.isfinite(initial_strength)
                and initial_strength > 0):
            raise ValueError(
                f"`initial_strength` must be a finite number > 0, got {initial_strength!r}.")
        self.initial_strength = float(initial_strength)
        if pull not in PULLS:
            raise ValueError(f"`pull` must be one of {PULLS}, got {pull!r}.")
        if pull == "focused" and self.inactive is None:
            raise ValueError('pull="focused" needs a count target (`inactive`), not `flops`.')
        self.pull = pull

    @property
    def is_zero(self):
        return self.inactive == 0

    def get_config(self):
        return {"inactive": self.inactive, "flops": self.flops, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency, "growth": self.growth,
                "initial_strength": self.initial_strength, "pull": self.pull}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
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
    layers inactive) over the model's; `multiplier`: the strength
    multiplier now; `reached`: whether the target is met; `removable`: the
    layers that can count towards it, with the FLOPs removing each saves.

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

    @property
    def inactive(self):
        return len(self.held)

    def __str__(self):
        wanted = (f"{self.target.inactive} inactive layers" if self.target.inactive is not None
                  else f"at most {self.target.flops:.0%} of the FLOPs")
        return (f"target {wanted}: {self.inactive} held ({', '.join(self.held) or 'none'}), "
                f"{self.flops_fraction:.1%} of the FLOPs once folded, multiplier "
                f"{self.multiplier:.3g}, {'reached' if self.reached else 'not reached'}")


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


class TargetController:
    """Runs a `DepthTarget` during one `fit` (used by `ActiveLayers`).

    `groups` are the model's `SparsityGroup`s with their strength
    variables installed; `total_steps` the steps `fit` will take (None if
    unknown).
    """

    def __init__(self, target, model, groups, total_steps, nonnegative_inputs=False):
        self.target, self.model, self.groups = target, model, groups
        self.nonnegative_inputs = nonnegative_inputs
        self.units = {}
        for group in groups:
            self.units.setdefault(group.name, []).append(group)
        end = target.end_step
        if end is None:
            if total_steps is None:
                raise ValueError(
                    "The number of steps of this fit is unknown (a dataset without a "
                    "length and no steps_per_epoch), so DepthTarget needs an explicit "
                    "`end_step`.")
            end = max(1, math.ceil(0.75 * total_steps))
        if end <= target.begin_step:
            raise ValueError(
                f"DepthTarget's `begin_step` ({target.begin_step}) must come before its end "
                f"step ({end}, three quarters of this fit's {total_steps} steps); give "
                "`end_step` or a smaller `begin_step`.")
        self.end = end
        self.frequency = target.frequency or max(1, (end - target.begin_step) // 100)
        self.base_flops = model_cost(model).flops
        self.savings, self.reasons = ({}, {}) if target.is_zero else removal_savings(
            model, list(self.units), nonnegative_inputs)
        self._check_feasible()
        mean = float(np.mean(list(self.savings.values()))) if self.savings else 1.0
        self.pull = {name: self.savings.get(name, 0) / mean for name in self.units}
        self.multiplier = 1.0
        # the proximal threshold is `learning rate x strength`: a decaying
        # schedule would shrink it while the continuation raises it
        self._first_rate = self._rate()
        self.rate_decay = 1.0
        self.held = []
        self.pulled = []  # with pull="focused": the layers pulled now
        self.sizes = {name: sum(int(np.prod(v.shape)) for g in groups for v in g.variables
                                if v is not None) for name, groups in self.units.items()}
        self.reached = target.is_zero
        self.flops_fraction = self._fraction(self.held)
        self._warned = False
        self._next_check = target.begin_step
        self._assign(0)

    def _check_feasible(self):
        target = self.target
        if target.inactive is not None and target.inactive > len(self.savings):
            why = "; ".join(f"'{name}': {reason}" for name, reason in self.reasons.items())
            raise ValueError(
                f"DepthTarget(inactive={target.inactive}) asks for more than the "
                f"{len(self.savings)} penalised layers of model '{self.model.name}' that "
                f"folding can remove ({', '.join(self.savings) or 'none'})"
                + (f"; the others cannot go: {why}" if why else "")
                + ". Ask for fewer, or penalise more layers.")
        if target.flops is not None:
            best = self._fraction(list(self.savings))
            if best > target.flops:
                raise ValueError(
                    f"DepthTarget(flops={target.flops}) cannot be met: with every penalised "
                    f"layer of model '{self.model.name}' inactive, the folded model keeps "
                    f"{best:.1%} of its FLOPs. Ask for at least {best:.3f}.")

    def _fraction(self, held):
        if not self.base_flops:
            return 1.0
        # exactly the held layers inactive: others that happen to be
        # inactive now are not counted on
        plan = plan_fold(self.model, nonnegative_inputs=self.nonnegative_inputs,
                         assume_inactive=frozenset(held),
                         assume_active=frozenset(self.units) - frozenset(held))
        return planned_flops(plan) / self.base_flops

    def _strength_of(self, group, name):
        if name in self.held:
            return HOLD_STRENGTH
        if self.reached or self.pull[name] == 0:
            return 0.0
        if self.target.pull == "focused" and name not in self.pulled:
            return 0.0
        base = group.strength if group.strength > 0 else self.target.initial_strength
        return base * self.multiplier * self.pull[name] / self.rate_decay

    def _rate(self):
        optimizer = getattr(self.model, "optimizer", None)
        while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
            optimizer = optimizer.inner_optimizer
        try:
            return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            return None

    def _assign(self, step=None):
        before = step is not None and step < self.target.begin_step
        for name, groups in self.units.items():
            for group in groups:
                value = 0.0 if before and name not in self.held else self._strength_of(
                    group, name)
                group.strength_variable.assign(value)

    def _allowed(self, step):
        span = self.end - self.target.begin_step
        progress = min(1.0, max(0.0, (step - self.target.begin_step) / span))
        if self.target.inactive is not None:
            return math.ceil(self.target.inactive * progress - 1e-9)
        return 1.0 - (1.0 - self.target.flops) * progress  # FLOPs fraction allowed now

    def due(self, step):
        """Whether to check after `step` steps (every `frequency` from
        `begin_step` until the target is reached)."""
        if self.reached or step < self._next_check:
            return False
        self._next_check = step + self.frequency
        return True

    def check(self, step, norms):
        """Update holds and strengths after `step` steps; `norms` maps layer
        names to the negative-part norm of their penalised tensors."""
        if self.reached:
            return
        inactive = [n for n in self.units if norms.get(n) == 0.0 and self.pull[n] > 0]
        candidates = sorted((n for n in inactive if n not in self.held),
                            key=lambda n: -self.pull[n])
        allowed = self._allowed(step)
        if self.target.inactive is not None:
            count = len(self.held)
            while candidates and len(self.held) < allowed:
                self.held.append(candidates.pop(0))
            if len(self.held) > count:
                self.flops_fraction = self._fraction(self.held)
            short = len(self.held) < allowed
            self.reached = len(self.held) >= self.target.inactive
        else:
            while candidates and self.flops_fraction > allowed:
                self.held.append(candidates.pop(0))
                self.flops_fraction = self._fraction(self.held)
            short = self.flops_fraction > allowed
            self.reached = self.flops_fraction <= self.target.flops
        if self.target.pull == "focused" and not self.reached:
            self._focus(norms, allowed)
        rate = self._rate()
        if rate is not None and self._first_rate:
            # at most a factor 1000: near the end of a decay to 0 the step is gone anyway
            self.rate_decay = min(max(rate / self._first_rate, 1e-3), 1.0)
        if not self.reached:
            if candidates:  # switched off beyond the allowance: let them back
                self.multiplier /= self.target.growth
            elif short:
                self.multiplier *= self.target.growth
        if step >= self.end and not self.reached and not self._warned:
            self._warned = True
            warnings.warn(
                f"DepthTarget not reached by step {self.end} on model '{self.model.name}': "
                f"{self.progress()}. Training goes on pulling; a later `end_step`, more "
                "epochs or a larger `initial_strength` give it more room.", stacklevel=2)
        self._assign(step)

    def _focus(self, norms, allowed):
        """Keep pulling the chosen layers until held; add the closest ones
        while fewer are pulled than the schedule still needs."""
        self.pulled = [n for n in self.pulled if n not in self.held]
        free = [n for n in self.units if self.pull[n] > 0 and n not in self.held
                and n not in self.pulled]

        def distance(name):
            norm = norms.get(name, float("inf"))
            norm = float("inf") if norm != norm else norm  # NaN: last
            return norm / math.sqrt(max(self.sizes[name], 1)) / self.pull[name]

        free.sort(key=distance)
        need = max(allowed - len(self.held), 1)
        while free and len(self.pulled) < need:
            self.pulled.append(free.pop(0))

    def progress(self):
        return TargetProgress(self.target, list(self.held), self.flops_fraction,
                              self.multiplier, self.reached, dict(self.savings))
