"""Section 3.1 of the paper: the simulation study behind Table 1.

For every setting (hidden layers l-1, activity probability s_W) and run, one
data set is drawn (`tf_layersparse.simulation.simulate`, y standardised on
the training split) and four estimators are trained with mini-batch
gradient descent (batch 10, lr 1e-2):

- LS: least squares on the full network;
- SLS: least squares + layer penalty (proximal steps, exact zeros);
- FLS: SLS folded with `tf_layersparse.fold`, then refitted from a fresh
  initialisation without the penalty;
- ILS: least squares on the true condensed network (an oracle).

All runs of a setting train together in a `BatchedMLP`; the condensed
networks of FLS and ILS are the full network with the merged layers
replaced by the identity, which is exactly their architecture.
"""

import dataclasses
import time

import numpy as np

from tf_layersparse.experiments.batched import BatchedMLP
from tf_layersparse.simulation import simulate

__all__ = ["SETTINGS", "METHODS", "Setting", "run_simulation", "settings_for", "summarise"]

METHODS = ("LS", "SLS", "FLS", "ILS")
WIDTH, INPUT_DIM, BATCH_SIZE, LEARNING_RATE = 5, 2, 10, 1e-2


@dataclasses.dataclass(frozen=True)
class Setting:
    hidden_layers: int
    sparsity: float
    epochs: int
    strength: float

    @property
    def label(self):
        return f"l-1={self.hidden_layers}, s_W={self.sparsity:g}"


# (l-1, s_W) -> (epochs, penalty strength), as the paper specifies
_PAPER = {
    (10, 0.1): (200, 0.2), (10, 0.3): (200, 0.12), (10, 0.9): (300, 0.07),
    (25, 0.1): (400, 0.05), (25, 0.3): (500, 0.05), (25, 0.9): (500, 0.05),
}
SETTINGS = tuple(Setting(h, s, e, lam) for (h, s), (e, lam) in _PAPER.items())


def settings_for(hidden_layers, sparsity, epochs=None, strength_scale=1.0):
    """The paper's settings for the requested grid (`epochs` overrides;
    every penalty strength is multiplied by `strength_scale`).

    Example:

    >>> [(s.label, s.epochs, s.strength) for s in settings_for([10], [0.3], strength_scale=2)]
    [('l-1=10, s_W=0.3', 200, 0.24)]
    """
    chosen = []
    for h in hidden_layers:
        for s in sparsity:
            if (h, s) in _PAPER:
                e, lam = _PAPER[(h, s)]
            else:  # outside the paper's grid: its rule for deep networks
                e, lam = (500, 0.05)
            chosen.append(Setting(h, s, epochs or e, lam * strength_scale))
    return chosen


def _data_seed(seed, setting, run):
    return [seed, setting.hidden_layers, int(round(setting.sparsity * 1000)), run]


def _train(setting, datasets, strengths, mask, seed, penalty_group):
    dims = [INPUT_DIM] + [WIDTH] * setting.hidden_layers + [1]
    net = BatchedMLP(dims, len(datasets), seed=seed, penalty_group=penalty_group)
    net.set_mask(mask)
    x = np.stack([d.x_train for d in datasets])
    y = np.stack([d.y_train for d in datasets])
    net.fit(x, y, epochs=setting.epochs, batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE, strengths=strengths, seed=seed)
    pred = net.predict(np.stack([d.x_test for d in datasets]))
    mse = np.mean((pred - np.stack([d.y_test for d in datasets])) ** 2, axis=(1, 2))
    return net, mse


def _ls_sls_ils(setting, runs, seed, penalty_group):
    """Draw the runs' data and train LS, SLS and ILS on it.

    The three do not depend on each other, so they are one batch of
    `3 * runs` networks: replicate `r` is LS, `runs + r` SLS, `2 * runs + r`
    ILS. Returns the data sets, the true condensed masks, the net and the
    test mse of every replicate.
    """
    datasets = [simulate(setting.hidden_layers, setting.sparsity,
                         width=WIDTH, input_dim=INPUT_DIM,
                         seed=_data_seed(seed, setting, r)) for r in range(runs)]
    full = np.ones((runs, setting.hidden_layers + 1), bool)
    true_mask = full.copy()
    for r, d in enumerate(datasets):
        true_mask[r, 1:setting.hidden_layers] = ~d.inactive[1:]
    strengths = np.repeat([0.0, setting.strength, 0.0], runs)
    masks = np.concatenate([full, full, true_mask])
    net, mse = _train(setting, datasets * 3, strengths, masks, seed, penalty_group)
    return datasets, true_mask, net, mse


def run_setting(setting, runs, seed=0, log=print, penalty_group="layer"):
    """Per-run records (dicts) of the four methods on one setting.

    `penalty_group="layer"` penalises each layer's kernel and bias entries
    together (the paper's Section 2.5); `"tensor"` penalises them separately.
    """
    datasets, true_mask, net, mse = _ls_sls_ils(setting, runs, seed, penalty_group)
    n_layers = setting.hidden_layers + 1
    active = net.active_hidden()
    sls = net.subset(np.arange(runs, 2 * runs))
    fls_mask, fold_errors = sls.fold_masks([d.x_test for d in datasets])
    if fold_errors.max() > 1e-5:
        log(f"warning: fold error {fold_errors.max():.2e} > 1e-5 in {setting.label}")
    fls, fls_mse = _train(setting, datasets, 0.0, fls_mask, seed + 1, penalty_group)
    records = []
    for r, data in enumerate(datasets):
        common = dict(hidden_layers=setting.hidden_layers, sparsity=setting.sparsity,
                      run=r, true_active=data.true_active)
        results = {
            "LS": (mse[r], active[r], n_layers, None),
            "SLS": (mse[runs + r], active[runs + r], n_layers, fold_errors[r]),
            "FLS": (fls_mse[r], int(fls_mask[r, 1:-1].sum()), int(fls_mask[r].sum()), None),
            "ILS": (mse[2 * runs + r], data.true_active, int(true_mask[r].sum()), None),
        }
        for method in METHODS:
            m, s, depth, err = results[method]
            records.append(dict(common, method=method, mse=float(m), s_hat=int(s),
                                depth=depth, fold_error=err))
    return records


def run_simulation(settings, runs, seed=0, log=print, penalty_group="layer"):
    """Records of every run of every setting, and the wall time per setting."""
    records, times = [], {}
    for setting in settings:
        start = time.perf_counter()
        records += run_setting(setting, runs, seed, log, penalty_group)
        times[setting.label] = time.perf_counter() - start
        log(f"{setting.label}: {runs} runs x 4 methods in {times[setting.label]:.1f} s")
    return records, times


def summarise(records, settings):
    """Table 1 rows: setting x method with median and third quartile."""
    rows = []
    for setting in settings:
        for method in METHODS:
            sel = [r for r in records if r["hidden_layers"] == setting.hidden_layers
                   and r["sparsity"] == setting.sparsity and r["method"] == method]
            if not sel:
                continue
            mse = np.array([r["mse"] for r in sel])
            s = np.array([r["s_hat"] for r in sel])
            rows.append(dict(
                setting=setting.label, hidden_layers=setting.hidden_layers,
                sparsity=setting.sparsity, method=method,
                mse_median=float(np.median(mse)), mse_q3=float(np.percentile(mse, 75)),
                s_median=float(np.median(s)), s_q3=float(np.percentile(s, 75)),
                true_s_median=float(np.median([r["true_active"] for r in sel])),
                runs=len(sel),
            ))
    return rows
