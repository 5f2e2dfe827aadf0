"""Track how many layers are still active while a model trains, and take
the penalty's proximal steps while it does."""

import json
import math
import warnings

import keras
import numpy as np

from tf_layersparse.analysis import negative_part_norms
from tf_layersparse.proximal import ProximalSteps, sparsity_groups
from tf_layersparse.regularizers import validate_strength
from tf_layersparse.steering import GUARD_STATES, TargetController
from tf_layersparse.targets import DepthTarget

__all__ = ["ActiveLayers"]


@keras.saving.register_keras_serializable(package="tf_layersparse")
class ActiveLayers(keras.callbacks.Callback):
    """Takes proximal steps during `fit` and logs `active_layers`.

    At the start of training it finds every tensor carrying a
    `LayerSparsity` regularizer (in any Sequential, Functional or subclassed
    model) and makes the optimizer follow each update with the penalty's
    proximal step, through Keras' variable constraints, so that it runs
    inside the compiled train step on every backend, with the optimizer's
    step size of that update (schedules and adaptive optimizers included;
    see `tf_layersparse.proximal`). Layers followed by BatchNormalization
    are stepped as blocks on their effective weights. When training ends
    the constraints are removed again.

    After each epoch it computes, for every layer carrying a `LayerSparsity`
    regularizer, the norm of the negative part of its kernel and bias, and
    writes the count of layers whose norm exceeds `tolerance` into `logs`
    under `active_layers`. Place it before `CSVLogger` and `TensorBoard` in
    the callback list; the progress bar and `History` always see it.

    Args:
        tolerance: a layer counts as active when its norm is > tolerance.
            0 (default) asks for exact zeros, as the proximal step gives.
            Layers with NaN or inf weights always count as active.
        patience: if set, stop training once the count has not changed for
            this many epochs.
        log_norms: also log each layer's norm as `negative_norm/<layer>`.
        proximal: take the proximal (and snap) steps the regularizers ask
            for (default); False only counts.
        target: a `DepthTarget`, or an integer `n` for
            `DepthTarget(inactive=n)`: steer the strengths so that this
            many layers end inactive (the pull is calibrated from the
            model; the regularizers' strengths only weigh layers against
            each other). Logs `target_inactive` (or `target_flops`),
            `held_layers`, `flops_fraction`, `strength_multiplier`,
            `pull_guard` (0 open, 1 paused, 2 backing off) and
            `pull_begin_step` (the step the pull began at; NaN while the
            warm-up lasts) each epoch, and for models with
            BatchNormalization blocks `inference_loss` (the smoothed
            inference-mode loss of the training batches the guard probed,
            as of the last check); `progress` says where it stands, and a
            warning says so if it is not reached by its end step. While it
            steers, BatchNormalization statistics follow the batches faster
            and held blocks normalise with their moving statistics in
            training too (`tf_layersparse.inference_mode`).
        nonnegative_inputs: with a target, whether the model inputs are
            >= 0 (as for `fold`), which decides what folding can remove.

    Attributes:
        progress: the target's `TargetProgress` (None without a target).
        norms: `{layer: norm}` after the last epoch.
        nonfinite: layers whose weights held NaN or inf at the last epoch.
        history: `{"active_layers": [...], <layer>: [...norms]}` per epoch.

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> base = keras.Sequential([keras.Input((2,))]
    ...     + [keras.layers.Dense(5, activation="relu") for _ in range(3)]
    ...     + [keras.layers.Dense(1)])
    >>> model = ls.apply_layer_sparsity(base, 0.1)
    >>> model.compile("sgd", "mse")
    >>> history = model.fit(np.ones((20, 2)), np.ones((20, 1)), epochs=2,
    ...                     callbacks=[ls.ActiveLayers()], verbose=0)
    >>> sorted(history.history)
    ['active_layers', 'loss']

    Asking for a depth instead of a strength:

    >>> callback = ls.ActiveLayers(target=2)
    >>> history = model.fit(np.ones((20, 2)), np.ones((20, 1)), epochs=2,
    ...                     callbacks=[callback], verbose=0)
    >>> sorted(history.history)  # doctest: +NORMALIZE_WHITESPACE
    ['active_layers', 'flops_fraction', 'held_layers', 'loss', 'pull_begin_step',
     'pull_guard', 'strength_multiplier', 'target_inactive']
    """

    def __init__(self, tolerance=0.0, patience=None, log_norms=False, proximal=True,
                 target=None, nonnegative_inputs=False):
        super().__init__()
        self.tolerance = validate_strength(tolerance, "tolerance")
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, (int, float))
            or not math.isfinite(patience) or int(patience) != patience or patience < 1
        ):
            raise ValueError(f"`patience` must be a positive integer, got {patience!r}.")
        self.patience = None if patience is None else int(patience)
        self.log_norms = bool(log_norms)
        self.proximal = bool(proximal)
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            target = DepthTarget(inactive=int(target))
        if target is not None and not isinstance(target, DepthTarget):
            raise TypeError(
                f"`target` must be a DepthTarget or an integer number of layers, got "
                f"{target!r} ({type(target).__name__}).")
        if target is not None and not self.proximal:
            raise ValueError("A `target` steers the proximal steps; it needs proximal=True.")
        self.target = target
        if target is None:
            # no per-batch work: a batch hook would make Keras run every
            # callback's batch hooks in step, each reading the logs back
            self.on_train_batch_end = keras.callbacks.Callback.on_train_batch_end.__get__(self)
        self.nonnegative_inputs = nonnegative_inputs
        self.progress = None
        self._controller = None
        self.norms = {}
        self.nonfinite = []
        self.history = {}
        self.stopped_epoch = None
        self._steps = None

    def on_train_begin(self, logs=None):
        self._groups = sparsity_groups(self.model)
        if not self._groups and not self.model.built:
            raise ValueError(
                f"Model '{self.model.name}' is not built yet, so its layers have no "
                "weights for ActiveLayers to step on (TensorFlow builds subclassed "
                "models at their first train step). Call the model on a batch, or "
                "`model.build(input_shape)`, before `fit`."
            )
        if not self._groups:
            raise ValueError(
                f"Model '{self.model.name}' has no layer with a LayerSparsity "
                "regularizer; use tf_layersparse.apply_layer_sparsity or pass "
                "kernel_regularizer=LayerSparsity(...)."
            )
        self.history = {"active_layers": []}
        self._last_count = None
        self._unchanged = 0
        self.stopped_epoch = None
        self._controller, self._step, self._epoch_start = None, 0, 0
        self._epochs_done, self._resume_pending, self._saved = 0, False, None
        self._stateful = False
        self._probing = False
        if self.proximal:
            steered = self.target is not None
            if steered:
                _refuse_unsteerable(self.model, self._groups)
            self._steps = ProximalSteps(self.model, self.model.optimizer, self._groups,
                                        steered=steered)
            try:
                self._steps.install()
                if steered:
                    self._controller = TargetController(
                        self.target, self.model, self._groups, self._total_steps(),
                        self.nonnegative_inputs)
            except Exception:
                self._steps.finish()
                self._steps = None
                raise
            self.progress = self._controller.progress() if steered else None
            # what a resumed run takes up: the target's state, and the
            # block steps' memory (see `_state_text`)
            self._stateful = steered or bool(self._steps.memories)
            self._saved = self._saved_state()  # loaded with the weights, if any
            self._resume_pending = True
            if self._stateful:
                for regularizer in self._regularizers():
                    regularizer.target_state = self._state_text
            if steered:
                self._request_probe(0)

    # ---- the target's state with the weights (see README, "Interrupting
    # and resuming a target run")
    def _regularizers(self):
        return list({id(r): r for g in self._groups for r in g.regularizers
                     if hasattr(r, "target_state")}.values())

    def _saved_state(self):
        """The newest state a checkpoint brought into the regularizers."""
        found = [json.loads(r.target_state) for r in self._regularizers()
                 if isinstance(r.target_state, str)]
        return max(found, key=lambda saved: saved.get("step", -1), default=None)

    def _state_text(self):
        """The state saved with the weights (JSON): the epochs done, the
        target's state (with a target) and whether each BatchNormalization
        block ended the last step inactive (`ProximalSteps.block_memory`)."""
        saved = {} if self._controller is None else self._controller.state_dict(self._step)
        saved["epoch"] = self._epochs_done
        if self._steps is not None and self._steps.memories:
            saved["blocks"] = self._steps.block_memory()
        return json.dumps(saved)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resume_pending:
            return
        self._resume_pending = False
        # BackupAndRestore may have loaded the weights after on_train_begin
        saved = self._saved_state() or self._saved
        if self._stateful:
            for regularizer in self._regularizers():
                regularizer.target_state = self._state_text
        if epoch == 0:
            return  # a new run
        self._epochs_done = epoch
        # the block steps remember the statistics and inactivity of the
        # step before: those the restored weights were saved after
        current = saved is not None and saved.get("epoch") == epoch
        self._steps.resume_block_memory(saved.get("blocks", {}) if current else {})
        if self._controller is None:
            return
        if saved is None or "target" not in saved:
            why = "no saved state of the target came with the weights"
        elif saved.get("epoch") != epoch:
            why = f"the saved state is from epoch {saved.get('epoch')}"
        elif saved.get("target") != self.target.get_config():
            why = "the saved state is for another target"
        elif not set(saved["strengths"]) <= set(self._controller.units):
            why = "the saved state names other layers (name the layers)"
        else:
            why = None
        if why is not None:
            warnings.warn(
                f"ActiveLayers: training resumes at epoch {epoch} but {why}; the depth target "
                "starts anew from here. Place ActiveLayers before BackupAndRestore and "
                "ModelCheckpoint in the callback list, and restore the weights that were saved "
                "with it.", stacklevel=2)
            return
        self._controller.load_state_dict(saved)
        self._step = self._epoch_start = saved["step"]
        self.progress = self._controller.progress()

    def _total_steps(self):
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        return steps * epochs if steps and epochs else None

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_start + batch + 1
        controller = self._controller
        if controller is None:
            return
        if controller.due(self._step):
            # `self.model` brings the JAX state back to the variables first
            norms = negative_part_norms(self.model, self._groups)
            probe = self._steps.probe
            controller.check(self._step, norms, controller.window_loss(batch, logs),
                             probe.value() if self._probing and probe is not None else None)
        self._request_probe(self._step)

    def _request_probe(self, step):
        """Switch the inference-mode probe on for the step after `step` if
        it ends with a check, off otherwise (only when that changes)."""
        probe, want = self._steps.probe, self._controller.due_next(step)
        if probe is not None and want != self._probing:
            self.model  # noqa: B018 (on JAX: the assignment reaches the next step's state)
            probe.request(want)
            self._probing = want

    def on_train_end(self, logs=None):
        if self._stateful:
            text = self._state_text()  # kept for a model.save after fit
            for regularizer in self._regularizers():
                regularizer.target_state = text
        if self._controller is not None:
            self.progress = self._controller.progress()
            if not self.progress.reached and not self._controller._warned:
                warnings.warn(
                    f"DepthTarget not reached on model '{self.model.name}' by the end of "
                    f"training: {self.progress}.", stacklevel=2)
            self._controller = None
        if self._steps is not None:
            self._steps.finish()
            self._steps = None
            self.norms = negative_part_norms(self.model, self._groups)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_start = self._step
        self._epochs_done = epoch + 1
        if self._controller is not None:
            self._controller.epoch_end(logs)
        self.norms = negative_part_norms(self.model, self._groups)
        nonfinite = [name for name, norm in self.norms.items() if math.isnan(norm)]
        for name in set(nonfinite) - set(self.nonfinite):
            warnings.warn(
                f"Layer '{name}' of model '{self.model.name}' has NaN or inf "
                "weights; it counts as active.", stacklevel=2)
        self.nonfinite = nonfinite
        count = sum(not norm <= self.tolerance for norm in self.norms.values())
        self.history["active_layers"].append(count)
        for name, norm in self.norms.items():
            self.history.setdefault(name, []).append(norm)
        if logs is not None:
            logs["active_layers"] = count
            if self._controller is not None:
                self.progress = progress = self._controller.progress()
                target = self.target
                if target.inactive is not None:
                    logs["target_inactive"] = target.inactive
                else:
                    logs["target_flops"] = target.flops
                logs["held_layers"] = progress.inactive
                logs["flops_fraction"] = progress.flops_fraction
                logs["strength_multiplier"] = progress.multiplier
                logs["pull_guard"] = GUARD_STATES.index(progress.guard)
                logs["pull_begin_step"] = (float("nan") if progress.begin_step is None
                                           else progress.begin_step)
                if self._controller.state.inference_loss is not None:
                    logs["inference_loss"] = self._controller.state.inference_loss
            if self.log_norms:
                for name, norm in self.norms.items():
                    logs[f"negative_norm/{name}"] = norm
        self._unchanged = self._unchanged + 1 if count == self._last_count else 0
        self._last_count = count
        if self.patience is not None and self._unchanged >= self.patience:
            self.model.stop_training = True
            self.stopped_epoch = epoch

    def get_config(self):
        return {
            "tolerance": self.tolerance,
            "patience": self.patience,
            "log_norms": self.log_norms,
            "proximal": self.proximal,
            "target": None if self.target is None else keras.saving.serialize_keras_object(
                self.target),
            "nonnegative_inputs": self.nonnegative_inputs,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("target") is not None:
            config["target"] = keras.saving.deserialize_keras_object(config["target"])
        return cls(**config)


def _refuse_unsteerable(model, groups):
    plain = sorted({g.name for g in groups if not g.proximal})
    if plain:
        raise ValueError(
            f"A depth target steers proximal steps, but layers {plain} of model "
            f"'{model.name}' carry LayerSparsity(proximal=False); use proximal=True.")
