"""Track how many layers are still active while a model trains, and take
the penalty's proximal steps while it does."""

import math
import warnings

import keras

from tf_layersparse.analysis import negative_part_norms
from tf_layersparse.proximal import ProximalSteps, sparsity_groups
from tf_layersparse.regularizers import validate_strength

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

    Attributes:
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
    """

    def __init__(self, tolerance=0.0, patience=None, log_norms=False, proximal=True):
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
        if self.proximal:
            self._steps = ProximalSteps(self.model, self.model.optimizer, self._groups)
            self._steps.install()

    def on_train_end(self, logs=None):
        if self._steps is not None:
            self._steps.finish()
            self._steps = None
            self.norms = negative_part_norms(self.model, self._groups)

    def on_epoch_end(self, epoch, logs=None):
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
        }
