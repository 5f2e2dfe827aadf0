"""Writing the studies' results: CSV, markdown tables in the paper's layout, plots.

Plots need matplotlib (`pip install tf_layersparse[plots]`); without it the
CSV and markdown files are still written and `plots_available()` is False.
"""

import csv
import os

import numpy as np

__all__ = [
    "TABLE1_FIELDS",
    "TABLE2_FIELDS",
    "write_csv",
    "read_csv",
    "table1_markdown",
    "table2_markdown",
    "plot_table1",
    "plot_figure2",
    "plot_figure3",
    "plots_available",
]

TABLE1_FIELDS = ("setting", "method", "mse_median", "mse_q3", "s_median", "s_q3",
                 "true_s_median", "runs")
TABLE2_FIELDS = ("dataset", "source", "method", "accuracy_mean", "accuracy_std",
                 "s_median", "s_min", "s_max", "depth_median", "draws", "strength",
                 "optimizer")


def write_csv(rows, path, fields):
    """Write dict `rows` to `path` with columns `fields` (extra keys ignored).

    Creates the parent directory; returns `path`.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out", "t.csv")
    >>> _ = write_csv([dict(a=1, b=2.5, extra="dropped")], path, ("a", "b"))
    >>> read_csv(path)
    [{'a': '1', 'b': '2.5'}]
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_csv(path):
    """Rows of a CSV file as dicts of strings (the inverse of `write_csv`)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table1_markdown(rows):
    """One line per setting; per method `mse median (q3)` and `ŝ median (q3)`.

    `rows` are `summarise` rows (or the same rows read back from CSV).

    Example:

    >>> row = dict(setting="l-1=10, s_W=0.1", method="SLS", mse_median=0.0123,
    ...            mse_q3=0.09, s_median=1, s_q3=2, true_s_median=1)
    >>> print(table1_markdown([row]))
    | setting | true ŝ | SLS mse | SLS ŝ |
    |---|---|---|---|
    | l-1=10, s_W=0.1 | 1 | 0.012 (0.090) | 1 (2) |
    <BLANKLINE>
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    head = "| setting | true ŝ | " + " | ".join(
        f"{m} mse | {m} ŝ" for m in methods) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(methods))]
    for setting in settings:
        by_method = {r["method"]: r for r in rows if r["setting"] == setting}
        first = next(iter(by_method.values()))
        cells = [setting, f"{float(first['true_s_median']):g}"]
        for m in methods:
            r = by_method[m]
            cells.append(f"{float(r['mse_median']):.3f} ({float(r['mse_q3']):.3f})")
            cells.append(f"{float(r['s_median']):g} ({float(r['s_q3']):g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table2_markdown(rows):
    """One line per data set and method: accuracy mean ± sd in %, ŝ, depth.

    Example:

    >>> row = dict(dataset="mnist", method="FCE", accuracy_mean=0.9474,
    ...            accuracy_std=0.002, s_median=2, s_min=1, s_max=3,
    ...            depth_median=4, draws=3)
    >>> print(table2_markdown([row]).splitlines()[-1])
    | mnist | FCE | 94.74 ± 0.20 | 2 (1-3) | 4 | 3 |
    """
    lines = ["| data | method | accuracy (%) | active hidden layers ŝ (median, range) "
             "| depth | draws |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['method']} | "
            f"{100 * float(r['accuracy_mean']):.2f} ± {100 * float(r['accuracy_std']):.2f} | "
            f"{float(r['s_median']):g} ({float(r['s_min']):g}-{float(r['s_max']):g}) | "
            f"{float(r['depth_median']):g} | {r['draws']} |"
        )
    return "\n".join(lines) + "\n"


def plots_available():
    """Whether matplotlib can be imported (the `plot_*` functions need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table1(records, path):
    """Box plots of test mse and ŝ per method, one column per setting."""
    plt = _pyplot()
    settings = list(dict.fromkeys((r["hidden_layers"], r["sparsity"]) for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(2, len(settings), figsize=(3.2 * len(settings), 6),
                             squeeze=False)
    for j, (h, s) in enumerate(settings):
        sel = [r for r in records if (r["hidden_layers"], r["sparsity"]) == (h, s)]
        for i, key in enumerate(("mse", "s_hat")):
            ax = axes[i, j]
            ax.boxplot([[r[key] for r in sel if r["method"] == m] for m in methods])
            ax.set_xticks(range(1, len(methods) + 1), methods)
            if key == "mse":
                ax.set_yscale("log")
                ax.set_title(f"l-1={h}, s_W={s:g}")
            else:
                ax.axhline(np.median([r["true_active"] for r in sel]), color="k",
                           ls="--", lw=1, label="true (median)")
                ax.legend(fontsize=7)
            if j == 0:
                ax.set_ylabel("test mse" if key == "mse" else "active hidden layers ŝ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_figure2(curves, path):
    """Training loss and test accuracy per epoch, CE vs FCE, per dataset.

    `curves[dataset][method] = (loss (epochs,), accuracy (epochs,))`.
    """
    plt = _pyplot()
    names = list(curves)
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), squeeze=False)
    for j, name in enumerate(names):
        for method, (loss, acc) in curves[name].items():
            epochs = np.arange(1, len(loss) + 1)
            axes[0, j].plot(epochs, loss, label=method)
            axes[1, j].plot(epochs, 100 * np.asarray(acc), label=method)
        axes[0, j].set_title(name)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("epoch")
        axes[0, j].legend()
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_figure3(sweeps, path):
    """Accuracy against penalty strength, theory and cross-validated choices marked.

    `sweeps[dataset] = dict(strengths, test_accuracy, val_accuracy, theory, cv)`.
    """
    plt = _pyplot()
    names = list(sweeps)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = sweeps[name]
        ax.plot(s["strengths"], 100 * np.asarray(s["test_accuracy"]), "o-", label="test")
        ax.plot(s["strengths"], 100 * np.asarray(s["val_accuracy"]), "s--", label="validation")
        ax.axvline(s["theory"], color="C2", label=f"theory ln(p)/sqrt(n) = {s['theory']:.3g}")
        ax.axvline(s["cv"], color="C3", ls=":", label=f"cross-validated = {s['cv']:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("penalty strength")
        ax.set_title(name)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("accuracy after fold + refit (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
