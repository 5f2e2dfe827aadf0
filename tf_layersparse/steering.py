"""How a `DepthTarget` steers the penalty: calibrated, one layer at a time,
guarded by the loss.

The decision is `steer(state, seen, plan)`: a pure function from what a
check measured (`Seen`: the negative-part norms, the smoothed losses) and
the fixed facts of the run (`Plan`) to the next `Steering` state (which
layers are held, which are pulled, how hard). `TargetController` only
measures, calls it and writes the strengths it implies into the variables
the compiled train step reads.

Calibration. A group's pull is measured in units of the model itself, not
of the regularizer's strength: when a layer's pull begins, the controller
measures `c`, the strength at which one proximal step would zero the
layer's negative part (`||min(w, 0) / step||`, the step in the optimizer's
own metric: the learning rate for SGD, `lr / (sqrt(v) + eps)` per entry
for Adam), and pulls with

    strength = multiplier * c * weight / slot

for the `slot` steps it gives that layer. With multiplier 1 the penalty
alone would remove the negative part evenly over the slot; the data
gradient pushes back, so the multiplier grows by `growth` at each check
where the layer is behind that line. It is unitless and reset to 1 for
each layer. The regularizers' strengths only set relative weights
(`weight`: a layer's strength over the mean of the penalised layers'),
and the learning rate's decay since the calibration is divided out, so
`learning rate x strength` stays as calibrated.

Handing on. A held Dense layer that feeds one Dense layer hands its map to
that layer and becomes the identity (`rebase_on_identity`; the outputs do
not change), and stays frozen there: training then moves the merged map
itself, as in the folded model. A chain of held layers is otherwise a
product of non-negative matrices, which a plain SGD step trains badly: on
the paper's MNIST MLP with 5 held layers, 10,000 images and 12 epochs,
SGD's penalised net went from 80.5 to about 90 per cent test accuracy with
it (docs/RESULTS.md).

One layer at a time. Only the layers being pulled carry a penalty (with
`pull="focused"` one: among the layers that would stack on the fewest held
ones when merged, the closest to inactive per unit of what removing it
saves; a chain of inactive layers merges into a product of non-negative
matrices, whose large leading singular value multiplies the step the
optimizer takes on it, and spreading the holds kept a deep MLP trained
with SGD from collapsing more often; docs/RESULTS.md); a check holds at most `max_new_holds` newly inactive layers
(projected onto the non-negative set from then on), and the next pull
begins only when the model has recovered: its smoothed loss is back
within the tolerance of its level when the last pull began (or half a
slot has passed). Layers that switch off beyond that allowance are
released: they carry no penalty until a later check may hold them.

Guard. The smoothed training loss (the mean over the steps since the last
check, exponentially averaged), the validation loss where `fit` has
validation data, and for models with BatchNormalization blocks the
smoothed inference-mode loss of the training batch of each check
(`inference_mode.InferenceProbe`; both are computed with the moving
statistics, as inference does, which training-mode losses never see) are
compared with their levels when the current pull began. While either stands more than `tolerance` (relative) above, the
pull pauses (no penalty on the pulled layers), and while it keeps rising
the multiplier backs off by `growth` per check. Once the end step is near
(late: the equal share of the steps left per layer still needed is less
than the schedule's share from the begin step), the guard no longer
pauses the pull, so that the target is met by its end step; it still
backs the multiplier off, and it pauses the pull again while a loss stands
beyond a hard limit: more than `HARD_LIMIT` (10) times the tolerance above
its level (with the default tolerance, twice its level) and more than
`WRECK_SHARE` (half) of the way back to its first, untrained level. The
loss is not traded for punctuality. Both parts are needed: a toy
regression's smoothed training loss strays 50 per cent from its level from
one check to the next under Adam, and late in training a loss near 0
doubles on a small absolute change; the relative limit alone stopped such
runs where the pull went on to meet the target.

Never late. The steps left are planned from the check at hand, wherever
the warm-up ended: each layer still needed gets an equal share of the
steps to the end step less a margin of `MARGIN_CHECKS` (2) checks (a layer
zeroed between two checks is held at the next one); a new pull keeps one
more share back for recovery while it is on time, and when late a pulled
layer whose line would end after its share (or has ended with the layer
still active) is calibrated again to that share, so that the penalty alone
would remove the last one a margin before the end step. There is a check
at the end step, and none holds a layer after it: a target not met there
ends with a warning that says what was reached and why; the held layers
stay held and the others keep their weights and train on unpenalised.

Every number the decision reads is shared by all replicas and processes
of a data-parallel run (weights after their all-reduced update, the loss
`fit` reports after its reduction), so every process takes the same
decisions.
"""

import dataclasses
import math
import warnings

import keras
import numpy as np

from tf_layersparse.proximal import HOLD_STRENGTH, IDENTITY_STRENGTH, optimizer_step_sizes
from tf_layersparse.targets import TargetProgress, planned_flops, removal_savings
from tf_layersparse.cost import model_cost
from tf_layersparse.folding.plan import plan_fold

__all__ = ["GUARD_STATES", "Plan", "Seen", "Steering", "TargetController", "one_step_strength",
           "rebase_on_identity", "steer"]

GUARD_STATES = ("open", "paused", "backing off")
LOSS_SMOOTHING = 0.3  # weight of the newest window in the smoothed loss
STATE_VERSION = 1  # of `TargetController.state_dict`
TAKE_OFF = 0.2  # relative fall of the smoothed loss from its first level that ends the warm-up
HARD_LIMIT = 10  # times the tolerance: a rise the guard never lets the end step override
WRECK_SHARE = 0.5  # ... and this share of the way back to the untrained loss
MARGIN_CHECKS = 2  # checks kept free before the end step
FINISH = 0.05  # a pulled layer behind its line below this part of its first norm: one step


@dataclasses.dataclass(frozen=True)
class Plan:
    """The fixed facts of one run of a target.

    `savings`: `{layer: FLOPs saved by removing it}` for the removable
    layers; `weights`: relative strengths (mean 1); `target`: count of
    layers (`inactive`) or None; `flops`: FLOPs fraction or None;
    `fraction(held)`: FLOPs fraction of the folded model with `held`
    inactive.
    """

    begin: int
    end: int
    savings: dict
    weights: dict
    inactive: int = None
    flops: float = None
    focused: bool = True
    max_new_holds: int = 1
    tolerance: float = 0.1
    growth: float = 1.1
    fraction: object = None  # held layers -> FLOPs fraction (FLOPs targets)
    base_flops: int = 0
    neighbours: dict = dataclasses.field(default_factory=dict)  # layers a merge would stack
    # the pull may begin before `begin` (then the latest) once training has taken off
    warmup: bool = False
    window: int = 1  # steps over which the warm-up measures how fast the loss falls
    every: int = 1  # steps between two checks

    def room(self, step):
        """Steps left for pulls after `step`: to the end step, less a
        margin of `MARGIN_CHECKS` checks (a layer zeroed between two checks
        is held at the next one)."""
        return self.end - step - MARGIN_CHECKS * self.every

    def needed(self, held, flops_fraction):
        """How many more layers the target needs (for FLOPs, the fewest of
        the largest savings that cover the excess)."""
        if self.inactive is not None:
            return max(self.inactive - len(held), 0)
        if flops_fraction <= self.flops:
            return 0
        excess = (flops_fraction - self.flops) * max(self.base_flops, 1)
        need = 0
        for saving in sorted((s for n, s in self.savings.items() if n not in held),
                             reverse=True):
            need += 1
            excess -= saving
            if excess <= 0:
                break
        return max(need, 1)

    def reached(self, held, flops_fraction):
        if self.inactive is not None:
            return len(held) >= self.inactive
        return flops_fraction <= self.flops


@dataclasses.dataclass(frozen=True)
class Seen:
    """What one check measured: the step, `{layer: negative-part norm}`,
    the mean training loss since the last check (None if unknown), the
    validation loss of the last epoch (None without validation data), and
    the inference-mode loss of the check's training batch (None if not
    measured)."""

    step: int
    norms: dict
    loss: float = None
    val_loss: float = None
    inference_loss: float = None  # a training batch's loss in inference mode


@dataclasses.dataclass
class Steering:
    """The controller's state between checks.

    `pulled`: `{layer: Pull}` now carrying a penalty; `scale` of a new pull
    is None until the controller calibrates it.
    """

    held: list = dataclasses.field(default_factory=list)
    holds: dict = dataclasses.field(default_factory=dict)  # layer -> step held
    pulled: dict = dataclasses.field(default_factory=dict)
    multiplier: float = 1.0
    loss: float = None  # smoothed training loss
    val_loss: float = None
    inference_loss: float = None  # smoothed, as the training loss
    # (loss, val_loss, inference_loss) when the current pull began
    reference: tuple = (None, None, None)
    guard: str = "open"
    paused: bool = False  # the guard stops the pull now
    recovering: tuple = None  # (step of the last hold, loss to get back to, checks since)
    flops_fraction: float = 1.0
    reached: bool = False
    released: tuple = ()
    began: int = None  # step at which the pull began (the warm-up ended)
    first_loss: float = None  # smoothed loss at the first check
    # (loss, val_loss, inference_loss) when each was first seen (untrained)
    first_levels: tuple = (None, None, None)
    trail: tuple = ()  # (step, smoothed loss) over the last warm-up window
    steepest: float = 0.0  # steepest relative fall of the loss over a window so far
    limited: bool = False  # the hard limit paused the pull after it was late
    stopped: str = None  # why the target ended unmet (at the end step)


@dataclasses.dataclass
class Pull:
    """One layer's pull: when it began, its negative norm then, the steps
    it is given, and its calibrated one-step strength."""

    start: int
    norm: float
    slot: float
    scale: float = None
    first: float = None  # its norm when its pull first began


def _smooth(previous, new):
    if new is None or not math.isfinite(new):
        return previous
    return new if previous is None else (1 - LOSS_SMOOTHING) * previous + LOSS_SMOOTHING * new


def _above(value, reference, tolerance):
    return (value is not None and reference is not None
            and value > reference * (1 + tolerance) + 1e-12)


def steer(state, seen, plan):
    """The next `Steering` after a check that saw `seen` (pure).

    In order: hold newly inactive layers; stop when the target is met;
    let the guard pause the pull; wait for recovery from the last hold;
    start the next pull; or pull harder where a layer is behind.

    Example:

    >>> plan = Plan(begin=0, end=100, savings={"a": 10, "b": 10}, weights={"a": 1, "b": 1},
    ...             inactive=1)
    >>> state = steer(Steering(), Seen(10, {"a": 0.5, "b": 0.2}, loss=1.0), plan)
    >>> list(state.pulled), state.guard            # the closest layer first
    (['b'], 'open')
    >>> state = steer(state, Seen(20, {"a": 0.5, "b": 0.0}, loss=1.0), plan)
    >>> state.held, state.reached
    (['b'], True)
    """
    state = dataclasses.replace(state, pulled=dict(state.pulled), held=list(state.held),
                                holds=dict(state.holds))
    previous_loss = state.loss
    state.loss = _smooth(state.loss, seen.loss)
    state.val_loss = seen.val_loss if seen.val_loss is not None else state.val_loss
    state.inference_loss = _smooth(state.inference_loss, seen.inference_loss)
    state.first_levels = tuple(
        first if first is not None else now for first, now in
        zip(state.first_levels, (state.loss, state.val_loss, state.inference_loss)))
    if state.reached or state.stopped:
        return state
    if state.began is None:
        if not _taken_off(state, seen, plan):
            return state
        state.began = seen.step
    if seen.step <= plan.end:  # never a hold after the end step
        _hold(state, seen, plan)
    if state.reached:
        state.pulled, state.guard, state.recovering, state.paused = {}, "open", None, False
        return state
    if seen.step >= plan.end:
        _stop(state)
        return state
    needed = max(plan.needed(state.held, state.flops_fraction), 1)
    left = plan.end - seen.step
    # each layer still needed gets an equal share of the steps left before
    # the end step less the margin; a new pull keeps one more share back
    # for the model to recover from the last hold while it is not late
    share = max(plan.room(seen.step) / needed, 1.0)
    slot = max(min(left / (needed + 1), share), 1.0)
    # late: that share is less than the schedule's share from the begin step
    late = share < (plan.end - state.began) / (plan.needed([], 1.0) + 1)
    if _guard(state, plan, previous_loss, late) or _recovering(state, seen, plan, slot, late):
        return state
    if not _start_pulls(state, seen, plan, needed, slot, max(plan.room(seen.step), 1.0)):
        _push(state, seen, plan, late, share)
    return state


def _stop(state):
    """End an unmet target at its end step: the held layers stay held,
    the others carry no penalty from now on."""
    state.stopped = (
        f"the guard paused the pull while a loss stood more than {HARD_LIMIT} times the "
        "tolerance above its level when the pull began and half the way back to its "
        "untrained level" if state.limited
        else "the pulled layer was not inactive in time")
    state.pulled, state.guard, state.recovering, state.paused = {}, "open", None, False


def _taken_off(state, seen, plan):
    """Whether the warm-up is over: at `plan.begin` at the latest; with
    `plan.warmup`, as soon as the smoothed loss stands `TAKE_OFF` below its
    first level and falls (over `plan.window` steps) less than half as
    fast as it did at its steepest."""
    if seen.step >= plan.begin:
        return True
    if not plan.warmup or state.loss is None:
        return False
    if state.first_loss is None:
        state.first_loss = state.loss
    trail = state.trail + ((seen.step, state.loss),)
    while len(trail) > 1 and seen.step - trail[1][0] >= plan.window:
        trail = trail[1:]
    state.trail = trail
    if seen.step - trail[0][0] < plan.window or trail[0][1] <= 0:
        return False
    fall = (trail[0][1] - state.loss) / trail[0][1]
    state.steepest = max(state.steepest, fall)
    return state.loss <= (1 - TAKE_OFF) * state.first_loss and fall < 0.5 * state.steepest


def _hold(state, seen, plan):
    """Hold newly inactive layers, the pulled ones first, at most
    `max_new_holds`; the others are released (no penalty for now)."""
    inactive = [n for n in plan.savings if seen.norms.get(n) == 0.0 and n not in state.held]
    inactive.sort(key=lambda n: (n not in state.pulled, -plan.savings[n]))
    room = plan.max_new_holds
    if plan.inactive is not None:
        room = min(room, plan.inactive - len(state.held))
    new = []
    for name in inactive:
        if len(new) >= room or plan.reached(state.held, state.flops_fraction):
            break
        new.append(name)
        state.held.append(name)
        state.holds[name] = seen.step
        if plan.fraction is not None:
            state.flops_fraction = plan.fraction(state.held)
    state.released = tuple(n for n in inactive if n not in new)
    for name in new + list(state.released):
        state.pulled.pop(name, None)
    if new:
        level = state.reference[0]
        state.recovering = (seen.step, level if level is not None else state.loss, 0)
    state.reached = plan.reached(state.held, state.flops_fraction)


def _guard(state, plan, previous_loss, late):
    """Raise or lower the guard; True while it pauses the pull (when late,
    only beyond the hard limit: `_wrecked`)."""
    raised = any(_above(value, reference, plan.tolerance) for value, reference in zip(
        (state.loss, state.val_loss, state.inference_loss), state.reference))
    if not raised:
        state.guard, state.paused = "open", False
        return False
    rising = previous_loss is not None and state.loss is not None and state.loss > previous_loss
    if state.guard != "open" and rising:
        state.guard = "backing off"
        state.multiplier = max(state.multiplier / plan.growth, 1.0 / plan.growth ** 10)
    else:
        state.guard = "paused"
    beyond = late and any(_wrecked(value, reference, first, plan.tolerance) for
                          value, reference, first in zip(
                              (state.loss, state.val_loss, state.inference_loss),
                              state.reference, state.first_levels))
    state.limited = state.limited or beyond
    state.paused = not late or beyond  # near the end the target wins, up to the hard limit
    return state.paused


def _wrecked(value, reference, first, tolerance):
    """Whether a loss stands beyond the hard limit: more than `HARD_LIMIT`
    times the tolerance above its level when the pull began, and more
    than `WRECK_SHARE` of the way from there back to its first (untrained)
    level. The second keeps a loss near 0 (a regression late in training)
    from doubling on noise alone."""
    if value is None or reference is None:
        return False
    limit = reference * (1 + HARD_LIMIT * tolerance)
    if first is not None and first > reference:
        limit = max(limit, reference + WRECK_SHARE * (first - reference))
    return value > limit + 1e-12


def _recovering(state, seen, plan, slot, late):
    """True while the model recovers from the last hold: until the
    smoothed loss is back within the tolerance of its level when that
    layer's pull began (after at least 3 checks), or half a slot passed."""
    if state.recovering is None:
        return False
    since, level, checks = state.recovering
    checks += 1
    back = checks > 2 and (level is None or state.loss is None
                           or state.loss <= level * (1 + plan.tolerance))
    if back or seen.step - since >= 0.5 * slot or late:
        state.recovering = None
        return False
    state.recovering = (since, level, checks)
    return True


def _start_pulls(state, seen, plan, needed, slot, left):
    """Pull the next layers (with `pull="focused"`, as many as may be
    held at one check): those stacking on the fewest held or pulled ones,
    then the closest to inactive per unit of saving. True if any began."""
    free = [n for n in plan.savings if n not in state.held and n not in state.pulled
            and n not in state.released]
    want = min(plan.max_new_holds, needed) if plan.focused else len(free) + len(state.pulled)

    def distance(name):
        norm = seen.norms.get(name, float("inf"))
        norm = float("inf") if norm != norm else norm  # NaN: last
        return norm / (plan.savings[name] * plan.weights.get(name, 1.0))

    def stacked(name):
        return sum(n in state.held or n in state.pulled for n in plan.neighbours.get(name, ()))

    free.sort(key=lambda name: (stacked(name), distance(name)))
    started = False
    while free and len(state.pulled) < want:
        name = free.pop(0)
        norm = seen.norms.get(name, float("nan"))
        if math.isfinite(norm):
            # pulling all: the closest first, the others staggered one
            # share of `left` apart (a check holds only `max_new_holds`)
            order = len(state.pulled) + 1
            state.pulled[name] = Pull(seen.step, norm, slot if plan.focused
                                      else left * min(order / needed, 1.0), first=norm)
            started = True
    if started:
        state.multiplier = 1.0
        state.reference = (state.loss, state.val_loss, state.inference_loss)
    return started


def _push(state, seen, plan, late, share):
    """Grow the multiplier where a pulled layer is behind the line along
    which the penalty alone would remove its negative part over its slot.
    When late, every pulled layer is calibrated again to be gone within
    its `share` of the steps left before the end step's margin, and the
    multiplier grows anyway; with a focused pull, a layer behind with less
    than `FINISH` of its first norm left is calibrated to be gone in one
    step (not with `pull="all"`: many tails at once would be a crowd)."""
    if not state.pulled:
        return  # nothing to pull harder (every free layer released or not finite)
    behind = any(
        seen.norms.get(n, float("inf"))
        > pull.norm * max(0.0, 1 - (seen.step - pull.start) / pull.slot)
        for n, pull in state.pulled.items())
    # pulling all, the closest is due first and the others a share apart
    ranked = sorted(state.pulled, key=lambda n: seen.norms.get(n, float("inf")))
    for name, pull in state.pulled.items():
        norm = seen.norms.get(name, float("nan"))
        # the tail: what is left is of the size the optimizer's own steps make
        # (Adam moves every weight by about its rate), so remove it in one step
        tail = (behind and plan.focused and pull.first is not None
                and norm <= FINISH * pull.first)
        due = share if plan.focused else share * (ranked.index(name) + 1)
        # a line that still runs and ends in time is kept: calibrating anew
        # from the norm left at every check would shrink it by a constant
        # share per check and never reach 0 (on a toy, 20 steps for the
        # last 7%)
        ends = pull.start + pull.slot
        overdue = ends > seen.step + due or ends <= seen.step
        if math.isfinite(norm) and ((late and overdue) or tail):
            state.pulled[name] = Pull(seen.step, norm, 1.0 if tail else due,
                                      first=pull.first)  # calibrated anew
    if behind or late:
        state.multiplier *= plan.growth


def rebase_on_identity(model, name, nonnegative_inputs=False, frozen=()):
    """Hands an inactive Dense layer's map to the Dense layer it feeds and
    makes it the identity; True if it did.

    With `h >= 0` the inactive layer computes `h @ K1 + b1` and the next
    one reads it: `(h @ K1 + b1) @ K2 + b2 = h @ (K1 @ K2) + (b1 @ K2 + b2)`,
    so setting `K2 <- K1 @ K2`, `b2 <- b1 @ K2 + b2` (in float64) and
    `K1 <- I`, `b1 <- 0` leaves the model's outputs as they were and the
    layer inactive. Training then moves the merged map directly, as it
    would in the folded model, instead of a product of a non-negative
    matrix and another, whose leading singular value scales the steps.
    Only a square Dense layer (no BatchNormalization) read by one Dense
    layer that is not in `frozen` (layers held at the identity, which would
    drop what they receive) qualifies; anything else is left as it is.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(3, activation="relu", name="a", kernel_initializer="ones"),
    ...     keras.layers.Dense(3, activation="relu", name="b", bias_initializer="ones",
    ...                        kernel_initializer=keras.initializers.RandomUniform(0, 1, seed=0)),
    ...     keras.layers.Dense(2, name="c")])
    >>> x = np.abs(np.random.default_rng(0).normal(size=(4, 3))).astype("float32")
    >>> before = model.predict(x, verbose=0)
    >>> rebase_on_identity(model, "b", nonnegative_inputs=True)
    True
    >>> np.allclose(model.predict(x, verbose=0), before, rtol=1e-6)
    True
    >>> model.get_layer("b").get_weights()[0].tolist() == np.eye(3).tolist()
    True
    >>> rebase_on_identity(model, "c")  # the output layer feeds nothing
    False
    """
    plan = plan_fold(model, nonnegative_inputs=nonnegative_inputs,
                     assume_inactive=frozenset({name}))
    for segment in plan.segments.values():
        names = [step.name for step in segment.steps]
        if name in names:
            break
    else:
        return False
    index = names.index(name)
    if index + 1 >= len(names) or any(
            part is not None for part in (segment.crossed, segment.residual, segment.padding)):
        return False
    step, following = segment.steps[index], segment.steps[index + 1]
    layer, successor = step.layer, following.layer
    if (type(layer) is not keras.layers.Dense or type(successor) is not keras.layers.Dense
            or step.batchnorm is not None or following.batchnorm is not None
            or successor.name in frozen):
        return False
    try:  # the successor must read this layer's output itself (no Dropout in between)
        if successor.input is not layer.output:
            return False
    except (AttributeError, ValueError):
        return False
    value = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
    k1 = value(layer.kernel)
    if k1.shape[0] != k1.shape[1]:
        return False
    b1 = value(layer.bias) if layer.use_bias else np.zeros(k1.shape[1])
    if np.any(k1 < 0) or np.any(b1 < 0) or (not successor.use_bias and np.any(b1 != 0)):
        return False  # not inactive (its ReLU acts), or a bias with nowhere to go
    k2 = value(successor.kernel)
    b2 = value(successor.bias) if successor.use_bias else 0.0
    successor.kernel.assign((k1 @ k2).astype(successor.kernel.dtype))
    if successor.use_bias:
        successor.bias.assign((b1 @ k2 + b2).astype(successor.bias.dtype))
    layer.kernel.assign(np.eye(k1.shape[0], dtype=layer.kernel.dtype))
    if layer.use_bias:
        layer.bias.assign(np.zeros(k1.shape[1], dtype=layer.bias.dtype))
    return True


def one_step_strength(group, optimizer):
    """The strength at which one proximal step would zero `group`'s
    negative part now: `||min(w, 0) / step||`, `step` the optimizer's step
    sizes (the view `group_step` takes: effective weights for blocks).

    Example:

    >>> import keras, tf_layersparse as ls
    >>> from tf_layersparse.proximal import sparsity_groups
    >>> layer = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(-0.3),
    ...                            kernel_regularizer=ls.LayerSparsity(0.1))
    >>> model = keras.Sequential([keras.Input((1,)), layer])
    >>> round(one_step_strength(sparsity_groups(model)[0], keras.optimizers.SGD(0.1)), 6)
    3.0
    """
    value = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
    step_of = lambda v: value(optimizer_step_sizes(optimizer, v))  # noqa: E731
    if group.batchnorm is None:
        pairs = [(value(v), step_of(v)) for v in group.variables]
    else:
        bn = group.batchnorm
        effective = group.effective_weights()  # kernels scaled, then the effective bias
        pairs = []
        for (variable, scaled), kernel in zip(group.kernels, effective[:-1]):
            step = step_of(variable)
            if group.block_step == "raw" or not scaled:
                pairs.append((value(variable), step))
            else:
                scale = kernel / np.where(value(variable) == 0, 1.0, value(variable))
                pairs.append((kernel, step * scale ** 2))
        bias_step = step_of(bn.beta) if bn.beta is not None else np.inf
        pairs.append((effective[-1], bias_step))
    total = 0.0
    for weights, step in pairs:
        step = np.broadcast_to(step, weights.shape)
        negative = np.minimum(weights, 0.0) / np.where(step > 0, step, np.inf)
        total += float(np.sum(negative ** 2))
    return math.sqrt(total)


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
        begin, end = target.schedule(total_steps)
        self.begin, self.end = begin, end
        warmup = (target.wait_for_takeoff and target.begin_step is None
                  and total_steps is not None)
        self.frequency = target.frequency or max(1, (end - (0 if warmup else begin)) // 200)
        self.base_flops = model_cost(model).flops
        self.savings, self.reasons = ({}, {}) if target.is_zero else removal_savings(
            model, list(self.units), nonnegative_inputs)
        self._check_feasible()
        strengths = {name: np.mean([g.strength for g in groups])
                     for name, groups in self.units.items() if name in self.savings}
        mean = float(np.mean(list(strengths.values()))) if strengths else 0.0
        weights = {name: (s / mean if mean > 0 else 1.0) for name, s in strengths.items()}
        self.plan = Plan(begin, end, dict(self.savings), weights, target.inactive,
                         target.flops, target.pull == "focused", target.max_new_holds,
                         target.tolerance, target.growth, self._fraction, self.base_flops,
                         self._neighbours(), warmup, max(2 * self.frequency, round(end / 20)),
                         self.frequency)
        self.state = Steering(flops_fraction=self._fraction([]), reached=target.is_zero)
        self._rates = {}
        self.rebased = []  # held layers frozen at the identity
        self._warned = False
        self._next_check = 0
        self._window = None  # (batch in epoch, running mean loss) at the last check
        self._val_loss = None
        self._assign()

    # ---- facts
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

    def _neighbours(self):
        """`{layer: removable layers next to it in a chain that folding would
        merge into one}`, with every removable layer inactive."""
        if not self.savings:
            return {}
        plan = plan_fold(self.model, nonnegative_inputs=self.nonnegative_inputs,
                         assume_inactive=frozenset(self.savings))
        found = {name: set() for name in self.savings}
        for segment in plan.segments.values():
            names = [step.layer.name for step in segment.steps]
            for a, b in zip(names, names[1:]):
                if a in found and b in found:
                    found[a].add(b)
                    found[b].add(a)
        return {name: tuple(sorted(n)) for name, n in found.items()}

    def _rate(self):
        optimizer = getattr(self.model, "optimizer", None)
        while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
            optimizer = optimizer.inner_optimizer
        try:
            return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            return None

    # ---- feeding the decision
    def due(self, step):
        """Whether to check after `step` steps (every `frequency` steps
        and at the end step, until the target is reached or stopped)."""
        if self.state.reached or self.state.stopped or (
                step < self._next_check and step != self.end):  # a check at the end step
            return False
        self._next_check = step + self.frequency
        return True

    def window_loss(self, batch, logs):
        """Mean training loss over the steps since the last check, from the
        running epoch mean `fit` logs after batch `batch` (0-based)."""
        loss = (logs or {}).get("loss")
        if loss is None:
            return None
        loss = float(loss)
        count = batch + 1
        last = self._window
        self._window = (count, loss)
        if last is None or last[0] >= count:  # a new epoch began
            return loss
        return (count * loss - last[0] * last[1]) / (count - last[0])

    def epoch_end(self, logs):
        """Record the validation loss of the epoch (inference mode)."""
        val = (logs or {}).get("val_loss")
        if val is not None and math.isfinite(float(val)):
            self._val_loss = float(val)
        self._window = None

    def due_next(self, step):
        """Whether the step after `step` ends with a check (the inference
        probe runs on that step)."""
        return not (self.state.reached or self.state.stopped) and (
            step + 1 >= self._next_check or step + 1 == self.end)

    def check(self, step, norms, loss=None, inference_loss=None):
        """Take the decision after `step` steps; `norms` maps layer names to
        the negative-part norm of their penalised tensors, `inference_loss`
        is the inference-mode loss of the step's batch (if measured)."""
        if self.state.reached or self.state.stopped:
            return
        before, held = set(self.state.pulled), len(self.state.held)
        self.state = steer(self.state, Seen(step, norms, loss, self._val_loss, inference_loss),
                           self.plan)
        if self.target.rebase:
            for name in self.state.held[held:]:
                if self._freezable(name) and rebase_on_identity(
                        self.model, name, self.nonnegative_inputs, frozen=self.rebased):
                    self.rebased.append(name)
        for name, pull in self.state.pulled.items():
            if name not in before or pull.scale is None:
                pull.scale = sum(one_step_strength(g, self.model.optimizer)
                                 for g in self.units[name])
                self._rates[name] = self._rate()
        if self.state.stopped and not self._warned:
            self._warned = True
            warnings.warn(
                f"DepthTarget not reached by step {self.end} on model '{self.model.name}': "
                f"{self.progress()}; {self.state.stopped}. The target ends here: the held "
                "layers stay held, the others keep their weights and train on without "
                "penalty. A later `end_step`, more epochs or a larger `tolerance` give it "
                "more room.", stacklevel=2)
        self._assign()

    def _freezable(self, name):
        """Whether the steps hold every weight of the layer (so that it can
        stay at the identity): no BatchNormalization, no unpenalised bias."""
        groups = self.units[name]
        stepped = {id(v) for g in groups for v in g.variables}
        layer = groups[0].layer
        return all(g.batchnorm is None for g in groups) and all(
            id(v) in stepped for v in layer.trainable_weights)

    # ---- keeping it across an interruption
    def state_dict(self, step):
        """What a resumed run needs to take the decisions this one would
        take from `step` on (JSON-able): the `Steering`, the learning rates
        of the calibrations, the layers at the identity and the strengths
        assigned now."""
        return {"version": STATE_VERSION, "target": self.target.get_config(), "step": int(step),
                "steering": dataclasses.asdict(self.state), "rates": dict(self._rates),
                "rebased": list(self.rebased), "warned": self._warned,
                "next_check": self._next_check, "val_loss": self._val_loss,
                "strengths": dict(self._assigned)}

    def load_state_dict(self, saved):
        """Take up the state `state_dict` gave (the same target and model)."""
        fields = dict(saved["steering"])
        fields["pulled"] = {n: Pull(**p) for n, p in fields["pulled"].items()}
        for name in ("reference", "released", "recovering", "first_levels"):
            if fields[name] is not None:
                fields[name] = tuple(fields[name])
        fields["trail"] = tuple(tuple(t) for t in fields["trail"])
        self.state = Steering(**fields)
        self._rates = dict(saved["rates"])
        self.rebased = list(saved["rebased"])
        self._warned = bool(saved["warned"])
        self._next_check = int(saved["next_check"])
        self._val_loss = saved["val_loss"]
        self._window = None
        held = set(self.state.held)
        for name, value in saved["strengths"].items():
            for group in self.units.get(name, ()):
                group.strength_variable.assign(value)
                if group.held_statistics is not None:
                    group.held_statistics.assign(1.0 if name in held else 0.0)
        self._assigned = dict(saved["strengths"])

    # ---- applying it
    def strengths(self):
        """`{layer: strength}` the state implies now."""
        state, values = self.state, {}
        for name in self.units:
            if name in self.rebased:
                values[name] = IDENTITY_STRENGTH
            elif name in state.held:
                values[name] = HOLD_STRENGTH
            elif state.reached or name not in state.pulled or state.paused:
                values[name] = 0.0
            else:
                pull = state.pulled[name]
                if pull.scale is None:
                    values[name] = 0.0
                    continue
                rate, first = self._rate(), self._rates.get(name)
                decay = min(max(rate / first, 1e-3), 1.0) if rate and first else 1.0
                values[name] = (state.multiplier * pull.scale * self.plan.weights.get(name, 1.0)
                                / pull.slot / decay)
        return values

    def _assign(self):
        self._assigned = {name: float(value) for name, value in self.strengths().items()}
        held = set(self.state.held)
        for name, value in self._assigned.items():
            for group in self.units[name]:
                group.strength_variable.assign(value)
                if group.held_statistics is not None:
                    # a held block normalises with its moving statistics in
                    # training too (tf_layersparse.inference_mode)
                    group.held_statistics.assign(1.0 if name in held else 0.0)

    def progress(self):
        return TargetProgress(self.target, list(self.state.held), self.state.flops_fraction,
                              self.state.multiplier, self.state.reached, dict(self.savings),
                              self.state.guard, sorted(self.state.pulled),
                              dict(self.state.holds), self.state.began)
