"""Proximal steps after every optimizer update, on every Keras backend.

Keras 3 optimizers, on TensorFlow, JAX and torch alike, call
`variable.constraint(variable)` for every trainable variable right after
their update, inside the compiled train step. This module turns that hook
into proximal gradient descent on `loss + strength * ||min(w, 0)||`: while
training runs, each group of penalised tensors gets a constraint whose call
replaces the group by its proximal step, with the step size the optimizer
has just used. The `ActiveLayers` callback installs the constraints at the
start of `fit` and removes them at its end, so the layers' own configs (and
`.keras` files) never see them.

Groups. A `LayerSparsity` tensor is its own group (`group="tensor"`); with
`group="layer"` a layer's kernel and bias share one norm (the paper's
Section 2.5). An affine layer followed by `BatchNormalization` forms a
*block*, whose inference map is affine with

    K_eff = K * s,   b_eff = beta + s * (b - mean),   s = gamma / sqrt(var + eps)

per output channel (`b` the layer's bias, 0 without one). With a
non-negative input the block's ReLU is the identity exactly when `K_eff` and
`b_eff` have no negative entry, so the block's group is `(K_eff, b_eff)`,
judged under the moving statistics that inference (and `fold`) use. A
channel with `gamma < 0` flips the sign of its column of `K_eff`: there the
raw kernel must be <= 0 for the block to be inactive. Two steps reach
`(K_eff, b_eff) >= 0`:

- `block_step="effective"`: the proximal step on `(K_eff, b_eff)`
  in the effective coordinates (each kernel entry's step size scaled by
  `s**2`, as the chain rule gives), mapped back to `K = K_eff / s` and
  `beta = b_eff - s * (b - mean)`; `gamma` is free.
- `block_step="raw"` (default): `gamma` is projected to `>= 0` (so `K_eff`
  has the signs of `K`) and the proximal step acts on `(K, b_eff)`. After
  refit it kept more accuracy at 4 of 5 strengths in
  benchmarks/block_formulations.py (docs/RESULTS.md).

`beta` absorbs the change of `b_eff`, so a block needs `center=True` (or a
layer bias) for its bias to be steered. The step reads the moving
statistics the same train step has just updated, so the last step leaves
`(K_eff, b_eff)` exactly >= 0 under the final statistics. On TensorFlow and
torch the constraint reads them from the variables. Inside a jitted JAX
step a constraint sees only the optimizer's state, so there (the one
backend-specific seam) block steps run in a wrapper around the model's
`train_step`, on the new state it returns.

Statistics drift. The forward pass moves the moving statistics, and with
them `b_eff`, by an amount that does not shrink with the learning rate,
while the proximal threshold `rate x strength` does. So for a block that
ended the previous step inactive, that drift may not push `b_eff` below
where the optimizer's own update left it (`min(b_eff under the previous
statistics, 0)`): a decaying rate does not let the statistics alone
re-activate it. TensorFlow and torch keep the previous statistics and
inactivity in variables made when the steps are installed (`ActiveLayers`
saves the inactivity with the weights and, when a `fit` resumes, takes both
up again: `block_memory`, `resume_block_memory`); JAX reads them from the
state the step receives.

Optimizers. SGD's step is its learning rate (with a schedule, this step's
value). Adaptive optimizers step each coordinate by its own size (Adam:
`lr_t / (sqrt(v) + eps)`); the proximal step is then taken in that metric
(see `group_prox`), which keeps exact zeros reachable: a group is zeroed
when `||min(w, 0) / step|| <= strength`. Optimizers without a rule here use
their learning rate, with a warning.
"""

import contextlib
import dataclasses
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from tf_layersparse.folding import eligible_layers
from tf_layersparse.inference_mode import (
    STEERED_MOMENTUM,
    HeldStatistics,
    InferenceProbe,
    state_variable,
    untrack,
)
from tf_layersparse.regularizers import (
    LayerSparsity,
    group_prox,
    negative_part_norm,
    positive_part,
)

__all__ = [
    "ProximalSteps",
    "SparsityGroup",
    "optimizer_step_sizes",
    "sparsity_groups",
]

# ---------------------------------------------------------------- groups


@dataclasses.dataclass
class SparsityGroup:
    """Tensors whose negative part is penalised in one norm.

    `kernels` are `(variable, scaled)` pairs: `scaled` says whether a
    following BatchNormalization multiplies the tensor's output channels
    (not the depthwise kernel of a separable convolution).
    """

    name: str
    layer: Any
    strength: float
    proximal: bool
    kernels: list
    bias: Any = None  # the layer's bias variable, if it is in the group
    batchnorm: Any = None  # BatchNormalization layer of a block
    snap_tolerance: float = 0.0
    block_step: str = "raw"
    # a scalar variable that replaces `strength` while a depth target steers it
    strength_variable: Any = None
    # a block's switch: > 0 runs its BatchNormalization in inference mode in
    # training too (`inference_mode.HeldStatistics`), while a target holds it
    held_statistics: Any = None

    def current_strength(self):
        """The strength the next step uses: the variable's value, read
        inside the compiled step, when a depth target steers the group."""
        if self.strength_variable is not None:
            return self.strength_variable.value
        return self.strength

    @property
    def variables(self):
        found = [v for v, _ in self.kernels]
        if self.bias is not None:
            found.append(self.bias)
        if self.batchnorm is not None:
            found += [w for w in (self.batchnorm.gamma, self.batchnorm.beta) if w is not None]
        return found

    @property
    def regularizers(self):
        return [v.regularizer for v, _ in self.kernels] + (
            [self.bias.regularizer] if self.bias is not None else []
        )

    def effective_weights(self):
        """The group's tensors as float64 numpy, BN folded in for blocks."""
        value = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
        if self.batchnorm is None:
            return [value(v) for v in self.variables]
        scale, shift = _batchnorm_affine_numpy(self.batchnorm)
        kernels = [
            value(v) * _channel_view(scale, v.shape, self.layer) if scaled else value(v)
            for v, scaled in self.kernels
        ]
        bias = value(self.layer.bias) if getattr(self.layer, "bias", None) is not None else 0.0
        return kernels + [shift + scale * bias]

    def negative_norm(self):
        """Norm of the negative part (effective for blocks); NaN if non-finite."""
        weights = self.effective_weights()
        if not all(np.all(np.isfinite(w)) for w in weights):
            return float("nan")
        return float(np.sqrt(sum(np.sum(np.minimum(w, 0.0) ** 2) for w in weights)))


def _batchnorm_affine_numpy(bn):
    value = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
    mean, var = value(bn.moving_mean), value(bn.moving_variance)
    gamma = value(bn.gamma) if bn.gamma is not None else np.ones_like(mean)
    beta = value(bn.beta) if bn.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - scale * mean


def _channel_view(scale, kernel_shape, layer):
    """`scale` (one entry per output channel) shaped to broadcast on a kernel."""
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # output channel c * multiplier + m sits at kernel[..., c, m]
        return ops.reshape(scale, tuple(kernel_shape[-2:])) if not isinstance(
            scale, np.ndarray) else scale.reshape(tuple(kernel_shape[-2:]))
    return scale


def _kernel_roles(layer):
    """`(variable, scaled)` for the kernel-like weights of an affine layer."""
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return [(layer.depthwise_kernel, False), (layer.pointwise_kernel, True)]
    kernel = getattr(layer, "kernel", None)
    return [(kernel, True)] if kernel is not None else []


def _penalised(variable):
    return variable is not None and isinstance(
        getattr(variable, "regularizer", None), LayerSparsity
    )


def _walk_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)
        else:
            yield layer


def _batchnorm_of(model):
    """`{affine layer name: BatchNormalization layer}` for blocks of `model`."""
    found = {}
    models = [model] + [m for m in model.layers if isinstance(m, keras.Model)]
    for m in models:
        try:
            report = eligible_layers(m)
        except TypeError:  # subclassed: its call() hides the graph
            continue
        for entry in report:
            bn = getattr(entry, "batchnorm", None)
            if bn:
                found[entry.name] = m.get_layer(bn)
    return found


def sparsity_groups(model, batchnorm=None):
    """The `SparsityGroup`s of every `LayerSparsity` tensor in `model`.

    `batchnorm` maps affine layer names to the BatchNormalization that
    follows them (found from the graph of Sequential and Functional models
    when None; a subclassed model gets no blocks).

    Example:

    >>> import keras, tf_layersparse as ls
    >>> reg = ls.LayerSparsity(0.1, group="layer")
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
    ...     2, name="d", kernel_regularizer=reg, bias_regularizer=reg)])
    >>> [(g.name, len(g.variables)) for g in sparsity_groups(model)]
    [('d', 2)]
    """
    if batchnorm is None:
        try:
            batchnorm = _batchnorm_of(model)
        except (TypeError, ValueError):
            batchnorm = {}
    groups = []
    for layer in _walk_layers(model):
        kernels = [(v, scaled) for v, scaled in _kernel_roles(layer) if _penalised(v)]
        bias = getattr(layer, "bias", None)
        bias = bias if _penalised(bias) else None
        if not kernels and bias is None:
            continue
        first = (kernels[0][0] if kernels else bias).regularizer
        bn = batchnorm.get(layer.name)
        if bn is not None and kernels:
            groups.append(_group(layer, first, kernels, bias, bn))
        elif first.group == "layer":
            groups.append(_group(layer, first, kernels, bias))
        else:
            groups += [_group(layer, v.regularizer, [(v, scaled)]) for v, scaled in kernels]
            if bias is not None:
                groups.append(_group(layer, bias.regularizer, [], bias))
    return groups


def _group(layer, regularizer, kernels, bias=None, batchnorm=None):
    return SparsityGroup(
        layer.name, layer, regularizer.strength, regularizer.proximal, kernels, bias,
        batchnorm, regularizer.snap_tolerance, regularizer.block_step,
    )


# ---------------------------------------------------------------- step sizes


def _unwrap(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


_warned = set()


def optimizer_step_sizes(optimizer, variable):
    """Step per unit gradient that `optimizer` has just taken on `variable`.

    Called between the update and the iteration count's increment (where
    Keras applies constraints): a scalar for SGD, a tensor shaped like
    `variable` for adaptive optimizers.

    Example:

    >>> import keras
    >>> round(float(optimizer_step_sizes(keras.optimizers.SGD(0.1), None)), 6)
    0.1
    """
    opt = _unwrap(optimizer)
    lr = ops.convert_to_tensor(opt.learning_rate)
    if isinstance(opt, keras.optimizers.SGD):
        return lr
    dtype = variable.dtype
    lr = ops.cast(lr, dtype)
    step = ops.cast(opt.iterations + 1, dtype)
    index = opt._get_variable_index(variable)
    if isinstance(opt, (keras.optimizers.Adam, keras.optimizers.Nadam)):
        # AdamW is an Adam; Nadam's momentum schedule changes m, not the metric
        v = opt._velocities[index]
        if getattr(opt, "amsgrad", False):
            v = opt._velocity_hats[index]
        correction = ops.sqrt(1 - ops.power(ops.cast(opt.beta_2, dtype), step))
        if isinstance(opt, keras.optimizers.Adam):
            correction = correction / (1 - ops.power(ops.cast(opt.beta_1, dtype), step))
            return lr * correction / (ops.sqrt(v) + opt.epsilon)
        return lr / (ops.sqrt(v) / correction + opt.epsilon)
    if isinstance(opt, keras.optimizers.Adamax):
        correction = 1 - ops.power(ops.cast(opt.beta_1, dtype), step)
        return lr / (correction * (opt._u[index] + opt.epsilon))
    if isinstance(opt, keras.optimizers.RMSprop):
        velocity = opt._velocities[index]
        if opt.centered:
            velocity = velocity - ops.square(opt._average_gradients[index])
        return lr / ops.sqrt(velocity + opt.epsilon)
    if isinstance(opt, keras.optimizers.Adagrad):
        return lr / ops.sqrt(opt._accumulators[index] + opt.epsilon)
    name = type(opt).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"tf_layersparse has no step-size rule for optimizer {name}; its "
            "proximal steps use the learning rate as the step size.",
            stacklevel=2,
        )
    return lr


# ---------------------------------------------------------------- the step


def _statistics_affine(bn, statistics):
    mean, var = statistics
    dtype = bn.beta.dtype if bn.beta is not None else mean.dtype
    gamma = bn.gamma.value if bn.gamma is not None else ops.ones_like(mean)
    scale = ops.cast(gamma, dtype) / ops.sqrt(ops.cast(var, dtype) + bn.epsilon)
    return scale, ops.cast(mean, dtype)


def group_step(group, optimizer, previous_statistics=None, was_inactive=None):
    """New values `{id(variable): tensor}` of one group after its step.

    `previous_statistics`: a block's BatchNormalization `(moving_mean,
    moving_variance)` before this train step, and `was_inactive` whether
    the block ended the previous step inactive. The forward pass has
    already moved the statistics, which moves the effective bias by an
    amount that does not shrink with the learning rate. For a block that
    was inactive, that drift may not push an entry of the effective bias
    below where the optimizer's own update left it (`min(b_eff under the
    previous statistics, 0)`), so a decayed rate's vanishing proximal
    threshold does not leave inactive blocks slightly active.
    """
    values = {}
    block_step, snap_tolerance = group.block_step, group.snap_tolerance
    if group.batchnorm is None:
        tensors = group.variables
        current = [v.value for v in tensors]
        if group.proximal:
            steps = [optimizer_step_sizes(optimizer, v) for v in tensors]
            if isinstance(_unwrap(optimizer), keras.optimizers.SGD):
                steps = steps[0]
            strength = group.current_strength()
            current = group_prox(current, steps, ops.maximum(strength, 0.0)
                                 if group.strength_variable is not None else strength)
            current = _project_if_held(group, current)
            if group.strength_variable is not None and _has_identity(tensors):
                # a negative strength freezes the layer at the identity (a held
                # layer whose map a depth target handed to the next layer)
                frozen = ops.less(strength, 0.0)
                current = [ops.where(frozen, _identity_like(v), c)
                           for v, c in zip(tensors, current)]
        if snap_tolerance > 0:
            current = _snap(current, snap_tolerance)
        return {id(v): c for v, c in zip(tensors, current)}

    bn, layer = group.batchnorm, group.layer
    statistics = (bn.moving_mean.value, bn.moving_variance.value)
    if block_step == "raw" and bn.gamma is not None:
        gamma = positive_part(bn.gamma.value)
        values[id(bn.gamma)] = gamma
    scale, mean = _statistics_affine(bn, statistics)
    if block_step == "raw" and bn.gamma is not None:
        scale = ops.cast(values[id(bn.gamma)], scale.dtype) / ops.sqrt(
            ops.cast(statistics[1], scale.dtype) + bn.epsilon)
    layer_bias = layer.bias.value if getattr(layer, "bias", None) is not None else 0.0
    beta = bn.beta.value if bn.beta is not None else None
    offset = scale * (layer_bias - mean)  # b_eff = beta + offset
    effective_bias = (beta if beta is not None else 0.0) + offset
    if previous_statistics is not None and was_inactive is not None and beta is not None:
        old_scale, old_mean = _statistics_affine(bn, previous_statistics)
        if block_step == "raw" and bn.gamma is not None:
            old_scale = ops.cast(values[id(bn.gamma)], old_scale.dtype) / ops.sqrt(
                ops.cast(previous_statistics[1], old_scale.dtype) + bn.epsilon)
        floor = ops.minimum(beta + old_scale * (layer_bias - old_mean), 0.0)
        effective_bias = ops.where(was_inactive, ops.maximum(effective_bias, floor),
                                   effective_bias)

    kernels, kernel_steps, factors = [], [], []
    for variable, scaled in group.kernels:
        k = variable.value
        factor = _channel_view(scale, variable.shape, layer) if (
            scaled and block_step == "effective") else None
        kernels.append(k * factor if factor is not None else k)
        factors.append(factor)
        if group.proximal:
            step = optimizer_step_sizes(optimizer, variable)
            kernel_steps.append(step * ops.square(factor) if factor is not None else step)
    current = kernels + [effective_bias]
    steerable = beta is not None
    if group.proximal:
        bias_step = optimizer_step_sizes(optimizer, bn.beta) if steerable else 0.0
        current = group_prox(current, kernel_steps + [bias_step], group.current_strength())
        current = _project_if_held(group, current)
    if snap_tolerance > 0:
        current = _snap(current, snap_tolerance)
    for (variable, _), new, old, factor in zip(group.kernels, current[:-1], kernels, factors):
        if factor is not None:
            new = _raw_kernel(new, old, variable.value, factor)
        values[id(variable)] = new
    if steerable:
        values[id(bn.beta)] = _beta_for(current[-1], offset, beta)
    # whether the block leaves this step inactive (for the next step's drift rule)
    values[INACTIVE] = ops.all(ops.stack(
        [ops.all(ops.greater_equal(t, 0)) for t in current]))
    return values


HOLD_STRENGTH = 1e30  # a strength that holds a layer inactive: a projection
INACTIVE = "inactive"  # key of group_step's result: the block ends the step inactive
IDENTITY_STRENGTH = -1.0  # a strength that freezes a square kernel at I (and its bias at 0)


def _project_if_held(group, tensors):
    """`tensors` with their negative part set to 0 while a target holds the group.

    A hold is a projection, not a proximal step with a huge strength: the
    proximal step scales with the step size, which a learning rate decayed
    to 0 makes 0, while SGD's momentum still moves the weights; those
    moves would leave a held layer slightly active (negative entries of
    1e-10) and `fold` would keep it.
    """
    if group.strength_variable is None:
        return tensors
    held = ops.greater_equal(group.current_strength(), HOLD_STRENGTH)
    return [ops.where(held, positive_part(t), t) for t in tensors]


def _has_identity(tensors):
    """Whether the group is a square kernel and/or a bias (a Dense layer
    that can be frozen at the identity)."""
    shapes = [tuple(v.shape) for v in tensors]
    return all(len(shape) == 1 or (len(shape) == 2 and shape[0] == shape[1])
               for shape in shapes)


def _identity_like(variable):
    if len(variable.shape) == 2:
        return ops.eye(variable.shape[0], dtype=variable.dtype)
    return ops.zeros(variable.shape, dtype=variable.dtype)


def _block_inactive(group):
    """Whether a block's effective kernel and bias are >= 0 now (tensor)."""
    bn, layer = group.batchnorm, group.layer
    scale, mean = _statistics_affine(bn, (bn.moving_mean.value, bn.moving_variance.value))
    layer_bias = layer.bias.value if getattr(layer, "bias", None) is not None else 0.0
    checks = [ops.all(ops.greater_equal(bn.beta.value + scale * (layer_bias - mean), 0))]
    for variable, scaled in group.kernels:
        k = variable.value
        if scaled:
            k = k * _channel_view(scale, variable.shape, layer)
        checks.append(ops.all(ops.greater_equal(k, 0)))
    return ops.all(ops.stack(checks))


def _raw_kernel(new, old, raw, factor):
    """The raw kernel whose effective kernel (`raw * factor`) is `new`.

    `old` is `raw * factor` before the step. Entries the step left alone
    keep their raw value and zeroed ones become exactly 0, by selection:
    dividing by `factor` and multiplying back need not round-trip, and a
    zeroed entry must not come back as -1e-11 (the block would stay
    active). Channels with `factor == 0` have no effective kernel and are
    left alone.
    """
    nonzero = ops.not_equal(factor, 0)
    moved = new / ops.where(nonzero, factor, ops.ones_like(factor))
    moved = ops.where(ops.equal(new, 0), ops.zeros_like(new), moved)
    keep = ops.logical_or(ops.logical_not(nonzero), ops.equal(new, old))
    return ops.where(keep, raw, moved)


def _beta_for(effective_bias, offset, beta):
    """`beta` giving `effective_bias = beta + offset`, sign-safe in float.

    `fold` recomputes the effective bias in float64 from the stored float32
    weights; a zeroed entry would then come out as +-1e-9, and a negative
    one keeps the block active. Entries meant to be >= 0 are therefore
    kept a few float32 roundings above 0.
    """
    dtype = beta.dtype
    eps = float(np.finfo(keras.backend.standardize_dtype(dtype)).eps)
    margin = 16 * eps * (ops.abs(offset) + ops.abs(beta))
    nonnegative = ops.logical_and(effective_bias >= 0, effective_bias < margin)
    return ops.where(nonnegative, margin, effective_bias) - offset


def _snap(tensors, tolerance):
    norm = ops.sqrt(sum(ops.square(negative_part_norm(t)) for t in tensors))
    small = norm <= tolerance
    return [ops.where(small, positive_part(t), t) for t in tensors]


def _strategy_scope(model):
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None and keras.backend.backend() == "tensorflow":
        return strategy.scope()
    return contextlib.nullcontext()


class _GroupConstraint(keras.constraints.Constraint):
    """Runs its group's step when Keras constrains the group's first tensor.

    Keras applies constraints after the whole update, so every tensor of the
    group already holds its new value; the other tensors are assigned here
    and their own constraints (if the user set any) still run.
    """

    def __init__(self, steps, group, leader, previous, memory=None):
        self.steps, self.group, self.leader, self.previous = steps, group, leader, previous
        # a block's BN statistics and inactivity at the end of the last step
        self.memory = memory

    def __call__(self, w):
        if self.memory is None:
            values = group_step(self.group, self.steps.optimizer)
        else:
            mean, variance, inactive = self.memory
            values = group_step(self.group, self.steps.optimizer,
                                (mean.value, variance.value), inactive.value)
            bn = self.group.batchnorm
            mean.assign(bn.moving_mean.value)
            variance.assign(bn.moving_variance.value)
            inactive.assign(values[INACTIVE])
        for variable in self.group.variables:
            if variable is not self.leader and id(variable) in values:
                variable.assign(ops.cast(values[id(variable)], variable.dtype))
        new = ops.cast(values.get(id(self.leader), w), w.dtype)
        return self.previous(new) if self.previous is not None else new


class ProximalSteps:
    """Installs the proximal (and snap) steps of a model's groups for `fit`.

    `install()` before training and `finish()` after it; `ActiveLayers`
    does both.
    """

    def __init__(self, model, optimizer, groups=None, steered=False):
        if getattr(_unwrap(optimizer), "gradient_accumulation_steps", None):
            raise ValueError(
                f"Model '{model.name}': layer-sparsity steps follow every optimizer "
                "update, so gradient accumulation is not supported."
            )
        self.model, self.optimizer = model, optimizer
        self.groups = sparsity_groups(model) if groups is None else groups
        # steered: every group reads its strength from a variable that a
        # depth target sets between steps (`SparsityGroup.strength_variable`)
        self.steered = bool(steered)
        self._saved, self._driven, self._wrapped, self._tracked = [], [], False, []
        # {block name: (group, (mean, variance, inactive) variables)}: the
        # block steps' memory from step to step (TensorFlow and torch)
        self.memories = {}
        # steered: held blocks normalise with their moving statistics, and a
        # probe measures the inference-mode loss (`tf_layersparse.inference_mode`)
        self.held_statistics = self.probe = None

    @staticmethod
    def _acts(group):
        return group.proximal or group.snap_tolerance > 0

    def install(self):
        trainable = {id(v) for v in self.model.trainable_variables}
        jax_blocks = []
        for group in self.groups:
            members = [v for v in group.variables if id(v) in trainable]
            if not members or not self._acts(group):
                continue
            if group.proximal:
                for reg in group.regularizers:
                    reg._driven = True
                    self._driven.append(reg)
            if self.steered:
                group.strength_variable = self._strength_variable(group)
            if keras.backend.backend() == "jax" and (
                    group.batchnorm is not None or group.strength_variable is not None):
                # a jitted JAX step shows a constraint neither the BN
                # statistics nor a variable outside the optimizer's state
                jax_blocks.append(group)
                continue
            leader = members[0]
            self._saved.append((leader, leader.constraint))
            memory = self._memory_of(group)
            if memory is not None:
                self.memories[group.name] = (group, memory)
            leader.constraint = _GroupConstraint(self, group, leader, leader.constraint, memory)
        if jax_blocks:
            self._wrap_jax_train_step(jax_blocks)
        if self.steered:
            blocks = [g for g in self.groups if g.batchnorm is not None
                      and g.strength_variable is not None]
            every = [layer for layer in _walk_layers(self.model)
                     if isinstance(layer, keras.layers.BatchNormalization)]
            self.held_statistics = HeldStatistics(self.model, [g.batchnorm for g in blocks],
                                                  every, STEERED_MOMENTUM)
            self.held_statistics.install()
            for group in blocks:
                group.held_statistics = self.held_statistics.switches[id(group.batchnorm)]
            if blocks:  # without BatchNormalization, inference sees what training does
                self.probe = InferenceProbe(self.model)
                self.probe.install()
        self._switch_train_function()

    def _strength_variable(self, group):
        # on JAX tracked by the model for the length of fit only (see `finish`)
        variable = state_variable(self.model, group.strength,
                                  f"{group.name}_layer_sparsity_strength")
        self._tracked.append(variable)
        return variable

    def _memory_of(self, group):
        """Variables that carry a block's BN statistics and inactivity from
        step to step (see `group_step`)."""
        bn = group.batchnorm
        if bn is None or not group.proximal or bn.beta is None:
            return None
        inactive = group.negative_norm() == 0.0
        with _strategy_scope(self.model):
            kept = [keras.Variable(keras.ops.convert_to_numpy(v.value), trainable=False,
                                   dtype=v.dtype, aggregation="only_first_replica",
                                   name=f"{bn.name}_previous_{name}")
                    for v, name in ((bn.moving_mean, "mean"),
                                    (bn.moving_variance, "variance"))]
            kept.append(keras.Variable(inactive, trainable=False, dtype="bool",
                                       aggregation="only_first_replica",
                                       name=f"{bn.name}_inactive"))
        return tuple(kept)

    def block_memory(self):
        """`{block: whether it ended the last step inactive}`, what a
        resumed run needs besides the weights to take the same block steps
        (the previous statistics are the moving statistics saved with the
        weights). Empty on JAX, whose step reads both from the state."""
        return {name: bool(keras.ops.convert_to_numpy(memory[2].value))
                for name, (_, memory) in self.memories.items()}

    def resume_block_memory(self, inactive):
        """Take up the block steps' memory after the weights were restored:
        the previous statistics are the moving statistics now, and each
        block's inactivity is `inactive[block]` (what `block_memory` gave
        when the weights were saved) or, for a block not in it, whether its
        negative part is 0 now (as at the start of `fit`)."""
        for name, (group, (mean, variance, was_inactive)) in self.memories.items():
            bn = group.batchnorm
            mean.assign(bn.moving_mean.value)
            variance.assign(bn.moving_variance.value)
            was_inactive.assign(bool(inactive[name]) if name in inactive
                                else group.negative_norm() == 0.0)

    def finish(self):
        for variable, previous in self._saved:
            variable.constraint = previous
        for reg in self._driven:
            reg._driven = False
        if self.probe is not None:
            self.probe.remove()
            self.probe = None
        if self.held_statistics is not None:
            self.held_statistics.remove()
            self.held_statistics = None
        if self._wrapped:
            del self.model.train_step  # the instance attribute; the method shows again
            self._wrapped = False
        untrack(self.model, self._tracked)
        for group in self.groups:
            group.strength_variable = group.held_statistics = None
        self._saved, self._driven, self._tracked, self.memories = [], [], [], {}
        cache = getattr(self.model, "_layersparse_train_function", None)
        if cache is not None:
            cache["sparse"] = self.model.train_function
            self.model.train_function = cache["plain"]

    def _signature(self):
        return (id(self.optimizer),) + tuple(
            (tuple(id(v) for v in g.variables), g.strength, g.proximal, g.snap_tolerance,
             g.block_step, id(g.batchnorm), id(g.strength_variable), id(g.held_statistics))
            for g in self.groups) + (id(self.probe.loss) if self.probe else None,)

    def _switch_train_function(self):
        # A compiled step reads constraints and regularizers when it is
        # traced, so the plain one cannot be used while the steps are
        # installed. Tracing again costs seconds per fit, so the traced
        # sparse step is kept for the next fit with the same compiled
        # model, optimizer and groups (compile() resets train_function,
        # which invalidates it) and the plain one comes back after fit.
        model = self.model
        if not getattr(model, "compiled", False):
            return
        plain = model.train_function
        cache = getattr(model, "_layersparse_train_function", None)
        signature = self._signature()
        if (cache is not None and cache["plain"] is plain and plain is not None
                and cache["signature"] == signature and cache["sparse"] is not None):
            model.train_function = cache["sparse"]
        else:
            model.make_train_function(force=True)
            model._layersparse_train_function = {
                "plain": plain, "signature": signature, "sparse": None}

    def _wrap_jax_train_step(self, groups):
        model, optimizer = self.model, _unwrap(self.optimizer)
        original = model.train_step

        remembered = [g for g in groups if g.proximal and g.batchnorm is not None
                      and g.batchnorm.beta is not None]

        def train_step(state, data):
            # the state coming in is the last step's result: its statistics
            # and whether each block left it inactive
            before = state[1]
            # positions when traced: variables tracked after this wrapper was
            # installed (held-statistics switches, the probe) may come before
            positions = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
            with keras.StatelessScope(state_mapping=list(
                    zip(model.trainable_variables, state[0]))
                    + list(zip(model.non_trainable_variables, before))):
                was_inactive = {id(g): _block_inactive(g) for g in remembered}
            logs, state = original(state, data)
            trainable, non_trainable, optimizer_values = state[:3]
            previous = {
                id(group): tuple(before[positions[id(v)]] for v in (
                    group.batchnorm.moving_mean, group.batchnorm.moving_variance))
                for group in remembered}
            mapping = (
                list(zip(model.trainable_variables, trainable))
                + list(zip(model.non_trainable_variables, non_trainable))
                + list(zip(self.optimizer.variables, optimizer_values))
            )
            with keras.StatelessScope(state_mapping=mapping):
                # step sizes are those of the update just made, before the
                # optimizer counted it
                optimizer.iterations.assign(optimizer.iterations - 1)
                values = {}
                for group in groups:
                    values.update(group_step(group, self.optimizer, previous.get(id(group)),
                                             was_inactive.get(id(group))))
            trainable = [
                ops.cast(values[id(v)], v.dtype) if id(v) in values else t
                for v, t in zip(model.trainable_variables, trainable)
            ]
            return logs, (trainable,) + tuple(state[1:])

        model.train_step = train_step
        self._wrapped = True

