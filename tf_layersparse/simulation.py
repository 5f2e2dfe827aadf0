"""The artificial data of Section 3.1 and the matching Keras networks."""

import dataclasses

import keras
import numpy as np

__all__ = ["SimulationData", "simulate", "relu_mlp"]


@dataclasses.dataclass
class SimulationData:
    """One simulated data set and the network that generated it.

    `weights[0]` is the input layer (d -> p), `weights[-1]` the output layer
    (p -> 1), in Keras order. `inactive[j]` says whether hidden layer j was
    drawn from U(0, 2); only hidden layers after the first can be inactive
    (the first reads x, which may be negative). `true_active` counts the
    hidden layers after the first that are active, the quantity ŝ estimates.
    `y` is standardised with the training split's mean and standard deviation
    (the paper leaves the scale open; raw outputs grow like width**depth).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    weights: list
    inactive: np.ndarray
    y_mean: float
    y_std: float

    @property
    def true_active(self):
        return int(np.sum(~self.inactive[1:]))

    @property
    def condensed_depth(self):
        """Hidden layers left after merging the truly inactive ones."""
        return 1 + self.true_active


def _forward(weights, x):
    h = x
    for w in weights[:-1]:
        h = np.maximum(h @ w, 0.0)
    return h @ weights[-1]


def simulate(
    hidden_layers=10,
    sparsity=0.1,
    *,
    width=5,
    input_dim=2,
    n_train=100,
    n_test=50,
    seed=None,
):
    """Draw one data set of the paper's simulation study (Section 3.1).

    Every hidden layer's weights are U(0, 2) with probability 1 - sparsity
    (an inactive layer), else U(-2, 2); the output layer is U(-2, 2). Inputs
    are N(0, I_d), noise N(0, 1), `y = f_W(x) + u`.

    Example:

    >>> data = simulate(hidden_layers=10, sparsity=0.1, seed=0)
    >>> data.x_train.shape, data.y_test.shape, len(data.weights)
    ((100, 2), (50, 1), 11)
    """
    rng = np.random.default_rng(seed)
    inactive = rng.random(hidden_layers) >= sparsity
    dims = [input_dim] + [width] * hidden_layers + [1]
    weights = []
    for j in range(hidden_layers):
        low = 0.0 if inactive[j] else -2.0
        weights.append(rng.uniform(low, 2.0, size=(dims[j], dims[j + 1])))
    weights.append(rng.uniform(-2.0, 2.0, size=(width, 1)))
    n = n_train + n_test
    x = rng.standard_normal((n, input_dim))
    y = _forward(weights, x) + rng.standard_normal((n, 1))
    mean, std = float(y[:n_train].mean()), float(y[:n_train].std())
    std = std if std > 0 else 1.0
    y = (y - mean) / std
    return SimulationData(
        x_train=x[:n_train].astype("float32"),
        y_train=y[:n_train].astype("float32"),
        x_test=x[n_train:].astype("float32"),
        y_test=y[n_train:].astype("float32"),
        weights=weights,
        inactive=inactive,
        y_mean=mean,
        y_std=std,
    )


def relu_mlp(input_dim, hidden_layers, width, outputs=1, output_activation=None,
             name="mlp", seed=None):
    """Sequential ReLU network: `hidden_layers` Dense(width, relu) + output.

    Example:

    >>> len(relu_mlp(2, 10, 5).layers)
    11
    """
    init = lambda i: keras.initializers.GlorotUniform(  # noqa: E731
        None if seed is None else seed + i
    )
    layers = [keras.Input((input_dim,), name="features")]
    for i in range(hidden_layers):
        layers.append(keras.layers.Dense(
            width, activation="relu", kernel_initializer=init(i),
            name=f"hidden_{i + 1}"))
    layers.append(keras.layers.Dense(
        outputs, activation=output_activation,
        kernel_initializer=init(hidden_layers), name="output"))
    return keras.Sequential(layers, name=name)
