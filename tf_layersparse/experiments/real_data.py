"""Section 3.2 and Appendix A of the paper: MNIST-family data (Table 2,
Figures 2 and 3).

Per draw, `n_train` training images are drawn at random (the test split is
used whole) and two estimators are trained on a ReLU network of
`hidden_layers` layers of width `width`:

- CE: cross-entropy;
- FCE: cross-entropy + layer penalty (proximal steps), folded with
  `tf_layersparse.fold`, then refitted from a fresh initialisation
  without the penalty.

The penalty strength defaults to the paper's theory value `ln(p)/sqrt(n)`
(p parameters, n training samples). The sweep of Figure 3 trains FCE over
a grid of strengths around it on one draw and picks the strength with the
best accuracy on `n_val` held-out training images (cross-validation).
"""

import dataclasses
import math
import time

import numpy as np

from tf_layersparse.experiments.batched import BatchedMLP

__all__ = ["RealDataConfig", "run_real_data", "theory_strength"]


@dataclasses.dataclass
class RealDataConfig:
    hidden_layers: int = 10
    width: int = 50
    n_train: int = 10_000
    n_val: int = 10_000
    n_test: int = 10_000
    epochs: int = 100
    batch_size: int = 100
    learning_rate: float = 0.05
    draws: int = 3
    strength: float = None  # None: theory value
    sweep: tuple = (0.1, 0.3, 1.0, 3.0)  # multiples of the theory value (and 1 is it)
    seed: int = 0
    penalty_group: str = "layer"  # kernel and bias together, as the paper's Section 2.5

    @property
    def optimizer(self):
        return f"SGD lr={self.learning_rate:g}, batch {self.batch_size}, {self.epochs} epochs"


def theory_strength(n_params, n_train):
    """The paper's tuning parameter `ln(p) / sqrt(n)`."""
    return math.log(n_params) / math.sqrt(n_train)


def _dims(config, n_features, n_classes):
    return [n_features] + [config.width] * config.hidden_layers + [n_classes]


def _n_params(dims):
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def _draw(images, config, draw):
    """(train, val, test) index sets for one draw; val/test None where unused."""
    rng = np.random.default_rng([config.seed, draw])
    if images.substitute:  # one split only: cut disjoint parts out of it
        n = len(images.x_train)
        order = rng.permutation(n)
        n_test = min(config.n_test, int(0.4 * n))
        n_train = min(config.n_train, int(0.4 * n))
        n_val = min(config.n_val, n - n_train - n_test)
        parts = np.split(order, [n_train, n_train + n_val, n_train + n_val + n_test])
        return (images.x_train[parts[0]], images.y_train[parts[0]],
                images.x_train[parts[1]], images.y_train[parts[1]],
                images.x_train[parts[2]], images.y_train[parts[2]])
    order = rng.permutation(len(images.x_train))
    train, val = order[:config.n_train], order[config.n_train:config.n_train + config.n_val]
    test = np.arange(len(images.x_test))[:config.n_test]
    return (images.x_train[train], images.y_train[train],
            images.x_train[val], images.y_train[val],
            images.x_test[test], images.y_test[test])


def _fce(dims, config, x, y, strengths, eval_data, seed, log, tag):
    """Penalised training, fold, refit. Returns (penalised net, refit net,
    penalised history, refit history, fold errors)."""
    k = len(strengths)
    penalised = BatchedMLP(dims, k, loss="sparse_categorical_crossentropy", seed=seed,
                           penalty_group=config.penalty_group)
    hist_p = penalised.fit(x, y, epochs=config.epochs, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, strengths=strengths,
                           seed=seed, validation_data=eval_data)
    masks, errors = penalised.fold_masks(eval_data[0][:, :1000])
    log(f"  {tag}: penalised nets have {penalised.active_hidden().tolist()} active hidden "
        f"layers; fold max rel. error {errors.max():.1e}")
    refit = BatchedMLP(dims, k, loss="sparse_categorical_crossentropy", seed=seed + 7)
    refit.set_mask(masks)
    hist_r = refit.fit(x, y, epochs=config.epochs, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, seed=seed + 7,
                       validation_data=eval_data)
    return penalised, refit, hist_p, hist_r, errors


def run_real_data(images, config, *, sweep=True, log=print):
    """Table 2 rows, Figure 2 curves and the Figure 3 sweep for one dataset."""
    start = time.perf_counter()
    n_features, n_classes = images.x_train.shape[1], int(images.y_train.max()) + 1
    dims = _dims(config, n_features, n_classes)
    draws = [_draw(images, config, d) for d in range(config.draws)]
    n_train = len(draws[0][0])
    theory = theory_strength(_n_params(dims), n_train)
    strength = theory if config.strength is None else config.strength
    x = np.stack([d[0] for d in draws])
    y = np.stack([d[1] for d in draws])
    test = (np.stack([d[4] for d in draws]), np.stack([d[5] for d in draws]))
    log(f"{images.name}: {config.draws} draws of {n_train} training / {len(draws[0][4])} "
        f"test images; strength {strength:.4g} (theory {theory:.4g}); {images.source}")

    ce = BatchedMLP(dims, config.draws, loss="sparse_categorical_crossentropy",
                    seed=config.seed)
    hist_ce = ce.fit(x, y, epochs=config.epochs, batch_size=config.batch_size,
                     learning_rate=config.learning_rate, seed=config.seed,
                     validation_data=test)
    penalised, refit, hist_p, hist_r, errors = _fce(
        dims, config, x, y, [strength] * config.draws, test, config.seed + 1, log, "FCE")
    ce_acc, fce_acc = hist_ce.val_accuracy[-1], hist_r.val_accuracy[-1]
    s_ce, s_fce = ce.active_hidden(), penalised.active_hidden()
    depth = refit.mask.sum(axis=1)
    common = dict(dataset=images.name, source=images.source, draws=config.draws,
                  optimizer=config.optimizer, n_train=n_train)
    rows = [
        dict(common, method="CE", accuracy_mean=ce_acc.mean(), accuracy_std=ce_acc.std(),
             s_median=np.median(s_ce), s_min=s_ce.min(), s_max=s_ce.max(),
             depth_median=float(len(dims) - 1), strength=0.0),
        dict(common, method="FCE", accuracy_mean=fce_acc.mean(), accuracy_std=fce_acc.std(),
             s_median=np.median(s_fce), s_min=s_fce.min(), s_max=s_fce.max(),
             depth_median=float(np.median(depth)), strength=strength,
             fold_error=float(errors.max())),
    ]
    curves = {
        "CE": (hist_ce.loss.mean(axis=1), hist_ce.val_accuracy.mean(axis=1)),
        "FCE (penalised)": (hist_p.loss.mean(axis=1), hist_p.val_accuracy.mean(axis=1)),
        "FCE (refit)": (hist_r.loss.mean(axis=1), hist_r.val_accuracy.mean(axis=1)),
    }
    result = dict(rows=rows, curves=curves, theory=theory, sweep=None)
    if sweep:
        result["sweep"] = _sweep(images, dims, config, draws[0], theory, log)
    log(f"{images.name}: done in {time.perf_counter() - start:.0f} s")
    result["seconds"] = time.perf_counter() - start
    return result


def _sweep(images, dims, config, draw, theory, log):
    """Figure 3: accuracy against strength on draw 0; CV on the validation part."""
    x_tr, y_tr, x_val, y_val, x_te, y_te = draw
    strengths = sorted({theory * m for m in config.sweep} | {theory})
    k = len(strengths)
    eval_data = (np.stack([x_val] * k), np.stack([y_val] * k))
    penalised, refit, _, hist_r, _ = _fce(
        dims, config, x_tr, y_tr, strengths, eval_data, config.seed + 2, log, "sweep")
    val_acc = hist_r.val_accuracy[-1]
    _, test_acc = refit.evaluate(np.stack([x_te] * k), np.stack([y_te] * k))
    best = int(np.argmax(val_acc))
    return dict(strengths=strengths, val_accuracy=val_acc.tolist(),
                test_accuracy=test_acc.tolist(),
                active=penalised.active_hidden().tolist(),
                theory=theory, cv=strengths[best])
