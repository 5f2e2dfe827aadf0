"""Retrain the condensed architecture without the penalty (Section 2.4)."""

import keras

from tf_layersparse.folding import fold

__all__ = ["refit"]


def _compile_arguments(model, optimizer, loss, metrics):
    given = {"optimizer": optimizer, "loss": loss, "metrics": metrics}
    config = {k: v for k, v in given.items() if v is not None}
    if all(k in config for k in ("optimizer", "loss")) or not getattr(model, "compiled", False):
        missing = [k for k in ("optimizer", "loss") if k not in config]
        if missing:
            raise ValueError(
                f"Model '{model.name}' is not compiled, so refit cannot reuse its "
                f"settings; pass {' and '.join(missing)} explicitly."
            )
        return config
    # reuse what the model was compiled with, for whatever was not given
    if "loss" not in config:
        config["loss"] = model.loss
    if "optimizer" not in config:
        # a fresh optimizer of the same configuration, not the trained one
        opt = model.optimizer
        config["optimizer"] = opt.__class__.from_config(opt.get_config())
    if "metrics" not in given or metrics is None:
        compile_config = model._compile_config.config if getattr(
            model, "_compile_config", None) else {}
        for key in ("metrics", "weighted_metrics", "loss_weights"):
            if compile_config.get(key) is not None:
                config[key] = compile_config[key]
    return config


def refit(
    model,
    x=None,
    y=None,
    *,
    nonnegative_inputs=False,
    policy="cost",
    keep_batchnorm=True,
    warm_start=False,
    optimizer=None,
    loss=None,
    metrics=None,
    seed=None,
    **fit_kwargs,
):
    """Fold `model`, then retrain the condensed network without the penalty.

    Following the paper, the condensed architecture starts from a fresh
    initialisation (each layer's own initializers); `warm_start=True` starts
    from the folded weights instead. The model is compiled with `model`'s
    loss, metrics and optimizer configuration (a new optimizer instance)
    unless `optimizer`, `loss` or `metrics` are given.

    Args:
        model: the trained layer-sparse model (or an already folded one).
        x, y: training data as for `Model.fit`; `x` may be a `tf.data.Dataset`.
        nonnegative_inputs, policy: passed to `fold`.
        keep_batchnorm: keep the BatchNormalization of every block that is
            not merged away (default), so the condensed net trains as the
            original did; False retrains the inference form, BN fused.
        warm_start: keep the folded weights instead of re-initialising.
        optimizer, loss, metrics: override the compile settings.
        seed: seeds the fresh initialisation, for reproducible refits.
        **fit_kwargs: passed to `Model.fit` (epochs, batch_size, callbacks,
            validation_data, verbose, ...).

    Returns:
        `(refitted_model, history)`.

    Example:

    >>> import keras, numpy as np, tf_layersparse as ls
    >>> base = keras.Sequential([keras.Input((2,))]
    ...     + [keras.layers.Dense(5, activation="relu") for _ in range(3)]
    ...     + [keras.layers.Dense(1)])
    >>> model = ls.apply_layer_sparsity(base, 0.1)
    >>> model.compile(keras.optimizers.SGD(1e-2), "mse")
    >>> x, y = np.ones((20, 2)), np.ones((20, 1))
    >>> small, history = ls.refit(model, x, y, epochs=2, verbose=0)
    >>> len(history.history["loss"])
    2
    """
    folded = fold(model, nonnegative_inputs=nonnegative_inputs, policy=policy,
                  keep_batchnorm=keep_batchnorm)
    if not warm_start:
        if seed is not None:
            keras.utils.set_random_seed(seed)
        folded = keras.models.clone_model(folded)
    folded.compile(**_compile_arguments(model, optimizer, loss, metrics))
    history = folded.fit(x, y, **fit_kwargs)
    return folded, history
