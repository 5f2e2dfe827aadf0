"""Track how many layers are still active while a model trains."""

import keras

from tf_layersparse.analysis import negative_part_norms

__all__ = ["ActiveLayers"]


@keras.saving.register_keras_serializable(package="tf_layersparse")
class ActiveLayers(keras.callbacks.Callback):
    """Logs `active_layers`, the number of penalised layers still active.

    After each epoch it computes, for every layer carrying a `LayerSparsity`
    regularizer, the norm of the negative part of its kernel and bias, and
    writes the count of layers whose norm exceeds `tolerance` into `logs`
    under `active_layers`. Place it before `CSVLogger` and `TensorBoard` in
    the callback list; the progress bar and `History` always see it.

    Args:
        tolerance: a layer counts as active when its norm is > tolerance.
            0 (default) asks for exact zeros, as the proximal step gives.
        patience: if set, stop training once the count has not changed for
            this many epochs.
        log_norms: also log each layer's norm as `negative_norm/<layer>`.

    Attributes:
        norms: `{layer: norm}` after the last epoch.
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

    def __init__(self, tolerance=0.0, patience=None, log_norms=False):
        super().__init__()
        if tolerance < 0:
            raise ValueError(f"`tolerance` must be >= 0, got {tolerance}.")
        if patience is not None and (int(patience) != patience or patience < 1):
            raise ValueError(f"`patience` must be a positive integer, got {patience}.")
        self.tolerance = float(tolerance)
        self.patience = patience
        self.log_norms = bool(log_norms)
        self.norms = {}
        self.history = {}
        self.stopped_epoch = None

    def on_train_begin(self, logs=None):
        if not negative_part_norms(self.model):
            raise ValueError(
                f"Model '{self.model.name}' has no layer with a LayerSparsity "
                "regularizer; use tf_layersparse.apply_layer_sparsity or pass "
                "kernel_regularizer=LayerSparsity(...)."
            )
        self.history = {"active_layers": []}
        self._last_count = None
        self._unchanged = 0
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        self.norms = negative_part_norms(self.model)
        count = sum(norm > self.tolerance for norm in self.norms.values())
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
        }
