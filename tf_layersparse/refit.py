"""Retrain the condensed architecture without the penalty (Section 2.4),
optionally distilling from a teacher (as DepthShrinker fine-tunes).

With a teacher the loss of each batch is

    (1 - weight) * task loss + weight * T**2 * KL(softmax(t / T) || softmax(s / T))

for the teacher's and student's logits `t` and `s` (log-probabilities when
the models end in a softmax, `from_logits=False`) and temperature `T`:
the soft targets of Hinton et al. (2015), whose gradients scale as
`1 / T**2`, hence the factor.
"""

import keras
from keras import ops

from tf_layersparse.folding import fold

__all__ = ["distillation_loss", "refit"]


def distillation_loss(teacher_outputs, student_outputs, temperature, from_logits=True):
    """Mean over the batch of `T**2 * KL(softmax(t / T) || softmax(s / T))`.

    Example:

    >>> import numpy as np
    >>> t = np.array([[2.0, 0.0, -1.0]], "float32")
    >>> float(distillation_loss(t, t, 4.0))
    0.0
    >>> round(float(distillation_loss(t, np.zeros((1, 3), "float32"), 1.0)), 4)
    0.5743
    """
    t = ops.convert_to_tensor(teacher_outputs)
    s = ops.cast(ops.convert_to_tensor(student_outputs), t.dtype)
    if not from_logits:  # probabilities: their logs are logits up to a constant
        tiny = 1e-7
        t, s = ops.log(ops.maximum(t, tiny)), ops.log(ops.maximum(s, tiny))
    t_log = ops.log_softmax(t / temperature, axis=-1)
    s_log = ops.log_softmax(s / temperature, axis=-1)
    kl = ops.sum(ops.exp(t_log) * (t_log - s_log), axis=-1)
    return temperature ** 2 * ops.mean(kl)


class _Frozen:
    """Holds the teacher outside Keras' tracking (its weights must neither
    train nor count as the student's)."""

    def __init__(self, model):
        self.model = model


class _Distilling(keras.Model):
    """A Functional model over the student's layers whose loss adds the
    distillation term; training it trains the student."""

    def __init__(self, student, teacher, weight, temperature, from_logits):
        super().__init__(student.inputs, student.outputs, name=f"{student.name}_distilling")
        self._frozen = _Frozen(teacher)
        self._weight, self._temperature = weight, temperature
        self._from_logits = from_logits

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        task = super().compute_loss(x, y, y_pred, sample_weight, training)
        soft = ops.stop_gradient(self._frozen.model(x, training=False))
        distilled = distillation_loss(soft, y_pred, self._temperature, self._from_logits)
        return (1 - self._weight) * task + self._weight * ops.cast(distilled, task.dtype)


def _check_teacher(teacher, student, weight, temperature):
    if not isinstance(teacher, keras.Model):
        raise TypeError(f"`teacher` must be a Keras model, got {type(teacher).__name__}.")
    if len(teacher.outputs or []) != 1 or len(student.outputs) != 1:
        raise ValueError(
            f"Distillation needs one output on teacher '{teacher.name}' and on the folded "
            f"model; they have {len(teacher.outputs or [])} and {len(student.outputs)}.")
    if tuple(teacher.outputs[0].shape[1:]) != tuple(student.outputs[0].shape[1:]):
        raise ValueError(
            f"Teacher '{teacher.name}' outputs shape {tuple(teacher.outputs[0].shape)} but the "
            f"folded model outputs {tuple(student.outputs[0].shape)}; distillation compares "
            "them class by class.")
    if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
        raise ValueError(f"`distillation_weight` must be in [0, 1], got {weight!r}.")
    if not (isinstance(temperature, (int, float)) and temperature > 0
            and temperature != float("inf")):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")


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
    teacher=None,
    distillation_weight=0.5,
    temperature=4.0,
    from_logits=True,
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
        teacher: a model with the same single output (the original, or
            the penalised `model` itself) to distil from while refitting;
            see the module docstring for the loss.
        distillation_weight: the weight in [0, 1] of the distillation
            term (1 - it weighs the task loss).
        temperature: softens both models' outputs.
        from_logits: whether the outputs are logits (False: probabilities).
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
    arguments = _compile_arguments(model, optimizer, loss, metrics)
    if teacher is None:
        folded.compile(**arguments)
        return folded, folded.fit(x, y, **fit_kwargs)
    _check_teacher(teacher, folded, distillation_weight, temperature)
    student = _Distilling(folded, teacher, float(distillation_weight), float(temperature),
                          bool(from_logits))
    student.compile(**arguments)
    history = student.fit(x, y, **fit_kwargs)
    # the folded model holds the trained weights; compiled for evaluate/predict
    folded.compile(**{k: v for k, v in arguments.items() if k != "optimizer"},
                   optimizer=student.optimizer)
    return folded, history
