"""What inference sees, during training: moving statistics that keep up
with a steered network, held blocks that normalise with them, and a probe
of the loss in inference mode.

A block (an affine layer followed by BatchNormalization) is inactive when
its inference map `K_eff x + b_eff`, with

    K_eff = K * s,   b_eff = beta + s * (b - mean),   s = gamma / sqrt(var + eps)

and `(mean, var)` the *moving* statistics, has no negative entry: that is
what `fold` merges and what a depth target holds. Inference normalises
every layer with its moving statistics, an exponential average
`m <- momentum * m + (1 - momentum) * batch` that trails the batch
statistics by about `momentum / (1 - momentum)` steps (9 at the study's
0.9, 99 at Keras' default 0.99) of whatever drift the network has.

Measured reason. A target reshapes each pulled block within its slot (on
the convnet study's MobileNet-style net, 2 epochs: about 13 steps a
layer) and then projects it every step, so the inputs of the layers after
it move far faster than plain training moves them (on a small BN net:
0.03-0.07 standard deviations a step against 0.006 without the penalty).
The moving statistics then trail by a good part of a standard deviation
in every layer, and the errors compound with depth: on the study's net
(Fashion-MNIST, 20,000 images, 2 epochs of Adam 1e-3,
`DepthTarget(flops=0.66)`; benchmarks/bn_inference.py) the moving means
ended up to 2.2 standard deviations from the means of the layers' inputs
in inference mode and the net scored 38.6% at inference against 79.8% in
training mode (batch statistics). Re-estimating the statistics with the
weights fixed gives back the training-mode accuracy (so it is lag, not a
different network), but would change which blocks are inactive; the fix
is in training instead:

- while a target steers, every BatchNormalization layer averages its
  statistics with `STEERED_MOMENTUM` (0.5, one step behind) when that is
  lower than its own momentum;
- once a block is held, its BatchNormalization runs in inference mode
  during training too: it normalises with its moving statistics and stops
  updating them. The held block is then one fixed affine map, the same in
  training and inference, exactly the one `fold` merges, and its
  statistics are parameters that no batch moves.

With both, the same run ended epoch 2 at 73.4% against 79.9% (momentum
alone 71.5%, the frozen held blocks alone 38.9%); with the study's SGD
(cosine-decayed) epoch 2 scored 85.8% against 85.5%, but epoch 1 caught
the net disrupted (9.9% at inference, 67.5% in training mode), where the
frozen held blocks alone gave 72.3% (docs/RESULTS.md; one seed).

The switch of a held block is a non-trainable scalar read inside the
compiled step (nothing retraces); on JAX it is tracked by the model for
the length of `fit`, as the steered strengths are, so the jitted step
reads it from its state. `HeldStatistics.install` wraps the layers'
`call` at the start of `fit` and `remove` restores them at its end, so
layer configs and `.keras` files never see it.

`InferenceProbe` gives the target's guard what inference sees without
waiting for validation data: on the train steps it is switched on for (the
one before each check), the step also computes the loss of its own batch
in inference mode, after the update, into a non-trainable scalar (one
forward pass per check; the train step's own work is unchanged).
"""

import keras
from keras import ops

__all__ = ["STEERED_MOMENTUM", "HeldStatistics", "InferenceProbe", "state_variable"]

# momentum of every BatchNormalization layer's moving statistics while a
# target steers (when lower than the layer's own): see the module docstring
STEERED_MOMENTUM = 0.5


def state_variable(model, value, name, dtype="float32"):
    """A non-trainable scalar the compiled train step reads and a callback
    sets between steps. On JAX the jitted step reads model variables only
    from the state it is given, so the model tracks it (call `untrack`
    when `fit` ends)."""
    strategy = getattr(model, "_distribute_strategy", None)
    scope = (strategy.scope() if strategy is not None
             and keras.backend.backend() == "tensorflow" else None)
    if scope is not None:
        with scope:
            variable = keras.Variable(value, trainable=False, dtype=dtype,
                                      aggregation="only_first_replica", name=name)
    else:
        variable = keras.Variable(value, trainable=False, dtype=dtype,
                                  aggregation="only_first_replica", name=name)
    if keras.backend.backend() == "jax":
        tracker = model._tracker
        locked = tracker.locked
        tracker.unlock()
        model._track_variable(variable)
        if locked:
            tracker.lock()
        _transient(model).append(variable)
    return variable


def untrack(model, variables):
    if keras.backend.backend() == "jax":
        transient = _transient(model)
        for variable in variables:
            model._untrack_variable(variable)
            transient[:] = [v for v in transient if v is not variable]
        if not transient:
            for name in ("save_own_variables", "load_own_variables"):
                vars(model).pop(name, None)
            _TRANSIENT.pop(id(model), None)


_TRANSIENT = {}  # id(model) -> the state variables it tracks for the length of `fit` (JAX)


def _transient(model):
    """The state variables `model` tracks while `fit` runs (JAX). Its
    own-variable save and load skip them, so that a model saved during
    `fit` (`ModelCheckpoint`) loads into a new model, which has none; what
    they hold is saved with the target's state."""
    if id(model) in _TRANSIENT:
        return _TRANSIENT[id(model)]
    transient = _TRANSIENT[id(model)] = []

    def own_variables():
        return [v for v in model._trainable_variables + model._non_trainable_variables
                if not any(v is t for t in transient)]

    def save_own_variables(store):
        for i, variable in enumerate(own_variables()):
            store[f"{i}"] = variable

    def load_own_variables(store):
        own = own_variables()
        if len(store.keys()) != len(own):
            raise ValueError(
                f"Model '{model.name}' has {len(own)} variables of its own, the file "
                f"{len(store.keys())}.")
        for i, variable in enumerate(own):
            variable.assign(store[f"{i}"])

    vars(model)["save_own_variables"] = save_own_variables
    vars(model)["load_own_variables"] = load_own_variables
    return transient


def _held_call(bn, original, held, momentum):
    """`bn.call` that, in training, normalises with the moving statistics
    and leaves them as they are while `held` is > 0 (`held` None: never),
    and otherwise averages them with `momentum` (if it is lower than the
    layer's own)."""

    def call(inputs, training=None, mask=None):
        if not training:
            return original(inputs, training=training, mask=mask)
        # copies: on TensorFlow `.value` may be the variable itself, read later
        mean, variance = ops.copy(bn.moving_mean.value), ops.copy(bn.moving_variance.value)
        frozen = original(inputs, training=False, mask=mask) if held is not None else None
        trained = original(inputs, training=training, mask=mask)  # updates the statistics
        new_mean, new_variance = bn.moving_mean.value, bn.moving_variance.value
        if momentum is not None and momentum < bn.momentum and not bn.renorm and mask is None:
            # the batch's own moments, averaged with `momentum` instead
            axes = [i for i in range(len(inputs.shape)) if i not in
                    [a % len(inputs.shape) for a in (bn.axis if isinstance(bn.axis, (list, tuple))
                                                     else [bn.axis])]]
            batch_mean, batch_variance = ops.moments(
                ops.cast(inputs, mean.dtype), axes=axes, synchronized=bn.synchronized)
            new_mean = momentum * mean + (1 - momentum) * batch_mean
            new_variance = momentum * variance + (1 - momentum) * ops.maximum(batch_variance, 0)
        if held is None:
            bn.moving_mean.assign(new_mean)
            bn.moving_variance.assign(new_variance)
            return trained
        on = ops.greater(held.value, 0.5)
        bn.moving_mean.assign(ops.where(on, mean, new_mean))
        bn.moving_variance.assign(ops.where(on, variance, new_variance))
        return ops.where(on, frozen, trained)

    return call


class HeldStatistics:
    """Switches for BatchNormalization layers to run in inference mode while
    training (see the module docstring).

    Example:

    >>> import keras, numpy as np
    >>> bn = keras.layers.BatchNormalization()
    >>> model = keras.Sequential([keras.Input((2,)), bn])
    >>> hold = HeldStatistics(model, [bn])
    >>> hold.install()
    >>> hold.set(bn, True)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]], "float32")
    >>> training, inference = (keras.ops.convert_to_numpy(model(x, training=t))
    ...                        for t in (True, False))
    >>> np.allclose(training, inference, atol=1e-5)
    True
    >>> hold.remove()
    >>> "call" in vars(bn)
    False
    """

    def __init__(self, model, batchnorms, others=(), momentum=None):
        self.model = model
        self.layers = list({id(bn): bn for bn in batchnorms}.values())
        held = {id(bn) for bn in self.layers}
        self.others = [bn for bn in {id(bn): bn for bn in others}.values()
                       if id(bn) not in held]
        self.momentum = momentum
        self.switches = {}

    def install(self):
        for bn in self.layers:
            switch = state_variable(self.model, 0.0, f"{bn.name}_held_statistics")
            self.switches[id(bn)] = switch
            # the instance attribute hides the class's method until `remove`
            bn.call = _held_call(bn, type(bn).call.__get__(bn), switch, self.momentum)
        if self.momentum is not None:
            for bn in self.others:
                bn.call = _held_call(bn, type(bn).call.__get__(bn), None, self.momentum)

    def set(self, bn, held):
        switch = self.switches.get(id(bn))
        if switch is not None:
            switch.assign(1.0 if held else 0.0)

    def remove(self):
        for bn in self.layers + self.others:
            if "call" in vars(bn):
                del bn.call
        untrack(self.model, self.switches.values())
        self.switches = {}


class InferenceProbe:
    """The inference-mode loss of a train step's own batch, on the steps it
    is switched on for (see the module docstring).

    `install()` wraps the model's `train_step` (call it before the train
    function is made), `remove()` restores it; `request(on)` switches it on
    or off for the next step and `value()` reads the last loss it measured
    (None before the first).
    """

    def __init__(self, model):
        self.model = model
        self.switch = self.loss = None
        self._saved = None
        self._measured = False

    def install(self):
        model = self.model
        self.switch = state_variable(model, 0.0, "layer_sparsity_probe_switch")
        self.loss = state_variable(model, float("nan"), "layer_sparsity_probe_loss")
        self._saved = vars(model).get("train_step")
        inner = model.train_step
        switch, loss = self.switch, self.loss

        def inference_loss(x, y, sample_weight):
            y_pred = model(x, training=False)
            value = model.compute_loss(x, y, y_pred, sample_weight, training=False)
            return ops.cast(ops.stop_gradient(value), "float32")

        if keras.backend.backend() == "jax":
            def train_step(state, data):
                logs, state = inner(state, data)
                trainable, non_trainable = state[0], list(state[1])
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
                mapping = (list(zip(model.trainable_variables, trainable))
                           + list(zip(model.non_trainable_variables, non_trainable)))
                with keras.StatelessScope(state_mapping=mapping):
                    value = ops.cond(ops.greater(switch.value, 0.5),
                                     lambda: inference_loss(x, y, sample_weight),
                                     lambda: ops.cast(loss.value, "float32"))
                index = [id(v) for v in model.non_trainable_variables].index(id(loss))
                non_trainable[index] = value
                return logs, (trainable, non_trainable) + tuple(state[2:])
        else:
            def train_step(data):
                logs = inner(data)
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
                loss.assign(ops.cond(ops.greater(switch.value, 0.5),
                                     lambda: inference_loss(x, y, sample_weight),
                                     lambda: ops.cast(loss.value, "float32")))
                return logs

        model.train_step = train_step

    def request(self, on):
        self.switch.assign(1.0 if on else 0.0)

    def value(self):
        value = float(keras.ops.convert_to_numpy(self.loss))
        return value if value == value else None

    def remove(self):
        model = self.model
        if "train_step" in vars(model):
            del model.train_step
        if self._saved is not None:
            model.train_step = self._saved
        untrack(model, [v for v in (self.switch, self.loss) if v is not None])
        self._saved = None
