"""Train many independent ReLU networks in one compiled computation.

A study such as the paper's Table 1 trains hundreds of tiny networks (width
5, batch 10). One `model.fit` each spends its time in Python and per-step
overhead, not arithmetic. `BatchedMLP` stacks R networks of the same layer
shapes along a leading replicate axis (kernels `(R, fan_in, units)`) and
trains them together with batched matmuls: each replicate has its own data,
batch order, initialisation, penalty strength and architecture mask, and its
loss does not touch the others' gradients.

The update is a gradient step on the data loss, then `layer_sparsity_prox`
(threshold `lr * strength`) on each penalised layer. With
`penalty_group="layer"` (the default, the paper's Section 2.5) the penalty is
the norm of the negative part of the layer's kernel and bias entries
together; with `"tensor"` kernel and bias are penalised separately, exactly
what `LayerSparseModel` does under `keras.optimizers.SGD` with
`LayerSparsity` as kernel and bias regularizer.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from tf_layersparse.regularizers import (
    layer_sparsity_prox,
    negative_part_norm,
    validate_strength,
)
from tf_layersparse.simulation import relu_mlp

__all__ = ["BatchedMLP", "History"]

LOSSES = ("mse", "sparse_categorical_crossentropy")
PENALTY_GROUPS = ("layer", "tensor")


@dataclasses.dataclass
class History:
    """Per-epoch arrays of shape `(epochs, R)`; `val_*` only with validation data."""

    loss: np.ndarray
    val_loss: np.ndarray = None
    val_accuracy: np.ndarray = None


def _glorot(rng, replicates, fan_in, units):
    limit = math.sqrt(6.0 / (fan_in + units))
    return rng.uniform(-limit, limit, (replicates, fan_in, units))


class BatchedMLP:
    """R independent ReLU MLPs `dims[0] -> ... -> dims[-1]`, trained at once.

    Layer `k` is `Dense(dims[k+1])` with ReLU, the last one linear (logits
    for classification). `mask[r, k] = False` replaces hidden layer `k` of
    replicate `r` by the identity (it needs `dims[k] == dims[k+1]`): that is
    the condensed network left after folding, at no extra cost. Layers in
    `penalised` (default: the hidden layers after the first, those that read
    a ReLU output and can become inactive) get the layer penalty with
    per-replicate `strengths`, on kernel and bias together
    (`penalty_group="layer"`) or on each separately (`"tensor"`).

    Example:

    >>> import numpy as np
    >>> net = BatchedMLP([2, 5, 5, 1], replicates=3, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(3, 20, 2)).astype("float32")
    >>> hist = net.fit(x, x[..., :1], epochs=2, batch_size=10, learning_rate=0.01)
    >>> hist.loss.shape, net.predict(x).shape
    ((2, 3), (3, 20, 1))
    """

    def __init__(self, dims, replicates, *, loss="mse", penalised=None,
                 penalty_group="layer", seed=0):
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
        if penalty_group not in PENALTY_GROUPS:
            raise ValueError(
                f"`penalty_group` must be one of {PENALTY_GROUPS}, got {penalty_group!r}.")
        self.penalty_group = penalty_group
        if len(dims) < 2 or replicates < 1:
            raise ValueError("need at least one layer and one replicate")
        self.dims, self.replicates, self.loss = list(dims), int(replicates), loss
        self.n_layers = len(dims) - 1
        self.penalised = (
            list(range(1, self.n_layers - 1)) if penalised is None else list(penalised)
        )
        rng = np.random.default_rng(seed)
        self.kernels = [
            tf.Variable(_glorot(rng, replicates, a, b).astype("float32"))
            for a, b in zip(dims[:-1], dims[1:])
        ]
        self.biases = [tf.Variable(np.zeros((replicates, b), "float32")) for b in dims[1:]]
        self.mask = np.ones((replicates, self.n_layers), bool)
        self._step_fn = None

    # weights -----------------------------------------------------------
    def set_mask(self, mask):
        """Skip hidden layers where `mask` is False (shape `(R, n_layers)`)."""
        mask = np.asarray(mask, bool)
        if mask.shape != (self.replicates, self.n_layers):
            raise ValueError(f"mask shape {mask.shape} != {(self.replicates, self.n_layers)}")
        for k in np.flatnonzero(~mask.all(axis=0)):
            if k in (0, self.n_layers - 1) or self.dims[k] != self.dims[k + 1]:
                raise ValueError(f"layer {k} cannot be skipped: it changes the width")
        self.mask = mask

    def set_replicate_weights(self, r, weights):
        """Load `[kernel_0, bias_0, kernel_1, ...]` (Keras order) into replicate r."""
        for k in range(self.n_layers):
            for var, value in ((self.kernels[k], weights[2 * k]),
                               (self.biases[k], weights[2 * k + 1])):
                full = var.numpy()
                full[r] = value
                var.assign(full)

    def replicate_weights(self, r):
        out = []
        for kernel, bias in zip(self.kernels, self.biases):
            out += [kernel.numpy()[r], bias.numpy()[r]]
        return out

    def to_keras(self, r, name="mlp"):
        """Replicate r as a Keras Sequential model (`relu_mlp` layout)."""
        widths = set(self.dims[1:-1])
        if len(widths) != 1:
            raise ValueError("to_keras needs equal hidden widths")
        model = relu_mlp(self.dims[0], self.n_layers - 1, widths.pop(),
                         outputs=self.dims[-1], name=name)
        model.set_weights(self.replicate_weights(r))
        return model

    def subset(self, indices):
        """A new BatchedMLP holding copies of the replicates at `indices`."""
        indices = np.asarray(indices)
        sub = BatchedMLP(self.dims, len(indices), loss=self.loss, penalised=self.penalised,
                         penalty_group=self.penalty_group)
        for var, src in zip(sub.kernels + sub.biases, self.kernels + self.biases):
            var.assign(src.numpy()[indices])
        sub.mask = self.mask[indices].copy()
        return sub

    def fold_masks(self, inputs):
        """Fold every replicate with `tf_layersparse.fold`; mask what it merged.

        Returns the `(R, n_layers)` mask of the condensed networks (a layer
        merged into the next becomes the identity) and each fold's max
        relative output error on `inputs[r]`, which must be <= 1e-5.
        """
        from tf_layersparse.folding import fold  # the product, not a re-derivation

        mask, errors = self.mask.copy(), []
        for r in range(self.replicates):
            model = self.to_keras(r)
            _, report = fold(model, verify=np.asarray(inputs[r]), return_report=True)
            errors.append(report.max_relative_error)
            for _, members in report.merges:
                for name in members[:-1]:  # relu_mlp names layer k "hidden_{k+1}"
                    mask[r, int(name.rsplit("_", 1)[1]) - 1] = False
        return mask, np.array(errors)

    def negative_norms(self):
        """(R, n_layers) norm of each layer's kernel and bias negative part together."""
        out = np.zeros((self.replicates, self.n_layers))
        for k, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            both = tf.concat([tf.reshape(kernel, (self.replicates, -1)), bias], axis=1)
            out[:, k] = negative_part_norm(both, axis=(1,)).numpy()[:, 0]
        return out

    def active_hidden(self):
        """(R,) number of penalised, unmasked layers with a negative entry."""
        norms, cols = self.negative_norms(), self.penalised
        return np.sum((norms[:, cols] > 0) & self.mask[:, cols], axis=1)

    # computation -------------------------------------------------------
    def _forward(self, x, mask):
        h = x
        for k in range(self.n_layers):
            z = tf.einsum("rbi,rio->rbo", h, self.kernels[k]) + self.biases[k][:, None, :]
            if k == self.n_layers - 1:
                return z
            a = tf.nn.relu(z)
            if self.dims[k] == self.dims[k + 1]:
                m = mask[:, k][:, None, None]
                a = m * a + (1.0 - m) * h
            h = a
        return h

    def _losses(self, logits, y):
        if self.loss == "mse":
            return tf.reduce_mean(tf.square(logits - y), axis=[1, 2])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y, tf.int32), logits=logits
        )
        return tf.reduce_mean(ce, axis=1)

    def _prox(self, k, thresholds):
        kernel, bias = self.kernels[k], self.biases[k]
        if self.penalty_group == "tensor":
            kernel.assign(layer_sparsity_prox(
                kernel, tf.reshape(thresholds, (-1, 1, 1)), axis=(1, 2)))
            bias.assign(layer_sparsity_prox(bias, tf.reshape(thresholds, (-1, 1)), axis=(1,)))
            return
        flat = tf.concat([tf.reshape(kernel, (self.replicates, -1)), bias], axis=1)
        flat = layer_sparsity_prox(flat, tf.reshape(thresholds, (-1, 1)), axis=(1,))
        size = kernel.shape[1] * kernel.shape[2]
        kernel.assign(tf.reshape(flat[:, :size], kernel.shape))
        bias.assign(flat[:, size:])

    def _build_step(self):
        variables = self.kernels + self.biases

        @tf.function(jit_compile=False, reduce_retracing=True)
        def epoch(x, y, order, lr, thresholds, mask, batch_size):
            steps = tf.shape(order)[1] // batch_size
            total = tf.zeros((self.replicates,))
            for s in tf.range(steps):
                idx = order[:, s * batch_size:(s + 1) * batch_size]
                xb = tf.gather(x, idx, batch_dims=1)
                yb = tf.gather(y, idx, batch_dims=1)
                with tf.GradientTape() as tape:
                    losses = self._losses(self._forward(xb, mask), yb)
                    objective = tf.reduce_sum(losses)  # replicates are independent
                grads = tape.gradient(objective, variables)
                for var, grad in zip(variables, grads):
                    var.assign_sub(lr * grad)
                for k in self.penalised:
                    self._prox(k, lr * thresholds)
                total += losses
            return total / tf.cast(steps, tf.float32)

        return epoch

    def fit(self, x, y, *, epochs, batch_size, learning_rate, strengths=None,
            shuffle=True, seed=0, validation_data=None):
        """Mini-batch gradient descent (+ proximal step) on every replicate.

        `x` is `(R, n, features)` (or `(n, features)`, shared), `y` is
        `(R, n, outputs)` for mse or `(R, n)` integer labels. Each epoch,
        each replicate visits its own random permutation of its data, drawn
        from `seed` (or the data in order with `shuffle=False`, as
        `model.fit(..., shuffle=False)`); an incomplete last batch is
        dropped. Returns a `History` of per-epoch mean training loss and,
        with `validation_data=(x_val, y_val)`, validation loss/accuracy.
        """
        x, y = self._stack(x), self._stack(y)
        n = x.shape[1]
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} > {n} samples")
        if strengths is None:
            strengths = np.zeros(self.replicates)
        strengths = np.broadcast_to(np.asarray(strengths, np.float64), (self.replicates,))
        for s in strengths:
            validate_strength(s)
        if self._step_fn is None:
            self._step_fn = self._build_step()
        x, y = tf.constant(x), tf.constant(y)
        lr = tf.constant(learning_rate, tf.float32)
        thresholds = tf.constant(strengths, tf.float32)
        mask = tf.constant(self.mask, tf.float32)
        rng = np.random.default_rng(seed)
        losses, val_loss, val_acc = [], [], []
        for _ in range(epochs):
            if shuffle:
                order = np.argsort(rng.random((self.replicates, n)), axis=1)
            else:
                order = np.broadcast_to(np.arange(n), (self.replicates, n))
            loss = self._step_fn(x, y, tf.constant(order, tf.int32), lr, thresholds,
                                 mask, tf.constant(batch_size))
            losses.append(loss.numpy())
            if validation_data is not None:
                vl, va = self.evaluate(*validation_data)
                val_loss.append(vl)
                val_acc.append(va)
        return History(
            np.array(losses),
            np.array(val_loss) if val_loss else None,
            np.array(val_acc) if val_acc else None,
        )

    def _stack(self, a):
        a = np.asarray(a)
        expected = 3 if (self.loss == "mse" or a.dtype.kind == "f") else 2
        if a.ndim == expected - 1:
            a = np.broadcast_to(a, (self.replicates,) + a.shape)
        if a.shape[0] != self.replicates:
            raise ValueError(f"leading axis {a.shape[0]} != {self.replicates} replicates")
        return a.astype("float32" if a.dtype.kind == "f" else "int32")

    def predict(self, x, batch_size=2000):
        """(R, n, outputs) outputs (logits for classification)."""
        x = self._stack(x)
        mask = tf.constant(self.mask, tf.float32)
        parts = [
            self._forward(tf.constant(x[:, i:i + batch_size]), mask).numpy()
            for i in range(0, x.shape[1], batch_size)
        ]
        return np.concatenate(parts, axis=1)

    def evaluate(self, x, y):
        """(R,) loss and (R,) accuracy (accuracy is None for mse)."""
        out, y = self.predict(x), self._stack(y)
        loss = self._losses(tf.constant(out), tf.constant(y)).numpy()
        if self.loss == "mse":
            return loss, None
        return loss, np.mean(np.argmax(out, axis=-1) == y, axis=1)
