"""The convnet study's report: accuracy over seeds, latency side by side, the
recommended model.

`summarise` reads `runs.jsonl`, groups the runs by model (the run name less
its seed), measures one model per group (the lowest seed's; with a fixed
FLOPs fraction the folded architecture can differ by seed, so FLOPs and
depth are also given as means) next to the BN-fused baseline, alternating
in one process (`convnet_measure`), and writes `summary.json`, `table.md`
and `pareto.png` (with matplotlib). The recommended model is chosen on
validation accuracy only (`choose_final`).
"""

import json
import os
import shutil

import keras
import numpy as np

from tf_layersparse.experiments import convnet_measure as measure
from tf_layersparse.experiments.convnet_study import read_runs

__all__ = [
    "REFERENCE",
    "SUMMARY_FIELDS",
    "summarise",
    "group_runs",
    "choose_final",
    "summary_markdown",
    "plot_pareto",
]

REFERENCE = "baseline"  # its deployable form is the BN-fused fold
SUMMARY_FIELDS = ("name", "seeds", "accuracy", "accuracy_std", "val_accuracy",
                  "val_accuracy_std", "conv_layers", "params", "flops", "latency_ms_batch1",
                  "latency_ms_batch64", "tflite_kb", "tflite_ms_batch1",
                  "tflite_ms_batch1_1thread", "int8_ms_batch1", "int8_accuracy", "path")
_CANDIDATES = ("target_", "refit_")
INT8_CALIBRATION = 256  # training images that calibrate the int8 quantization
INT8_TEST = 2000        # test images the int8 models are scored on


def group_runs(rows):
    """`{model: [rows]}`, the runs grouped by their name less the seed, seeds ascending.

    >>> group_runs({"a_s1": dict(config="a", seed=1), "a_s0": dict(config="a", seed=0)})
    {'a': [{'config': 'a', 'seed': 0}, {'config': 'a', 'seed': 1}]}
    """
    groups = {}
    for row in sorted(rows.values(), key=lambda r: (r["config"], r["seed"])):
        groups.setdefault(row["config"], []).append(row)
    return groups


def _spread(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def choose_final(models, tolerance):
    """Name of the fastest candidate (batch 1) whose mean validation accuracy is at
    least the reference's less `tolerance`; else the most accurate candidate.

    `models` maps names to dicts with `val_accuracy` and `latency_ms_batch1`.

    >>> models = {"baseline": dict(val_accuracy=0.90, latency_ms_batch1=2.0),
    ...           "target_a": dict(val_accuracy=0.898, latency_ms_batch1=1.0),
    ...           "refit_b": dict(val_accuracy=0.85, latency_ms_batch1=0.5)}
    >>> choose_final(models, 0.005), choose_final(models, 0.001)
    ('target_a', 'target_a')
    """
    reference = models[REFERENCE]["val_accuracy"]
    candidates = [n for n in models if n.startswith(_CANDIDATES)]
    if not candidates:
        return REFERENCE
    good = [n for n in candidates if models[n]["val_accuracy"] >= reference - tolerance]
    if good:
        return min(good, key=lambda n: (models[n]["latency_ms_batch1"],
                                        -models[n]["val_accuracy"]))
    return max(candidates, key=lambda n: models[n]["val_accuracy"])


def _measure(models, out, config, log, data=None):
    keras_models = {name: keras.saving.load_model(os.path.join(out, path))
                    for name, path in models.items()}
    times = {name: {} for name in models}
    for batch in (1, 64):
        for name, ms in measure.keras_latency(keras_models, batch,
                                              repeats=config.latency_repeats,
                                              number=5 if batch == 1 else 2).items():
            times[name][f"latency_ms_batch{batch}"] = ms
    log("Keras latency measured")
    paths, int8 = {}, {}
    for name, model in keras_models.items():
        paths[name] = os.path.join(out, "models", f"{name}.tflite")
        times[name]["tflite_kb"] = measure.to_tflite(model, paths[name])
        if data is not None:
            int8[name] = os.path.join(out, "models", f"{name}.int8.tflite")
            measure.to_tflite(model, int8[name], representative=data[0][:INT8_CALIBRATION])
    for threads, key in ((config.tflite_threads, "tflite_ms_batch1"),
                         (1, "tflite_ms_batch1_1thread")):
        for name, ms in measure.tflite_latency(paths, repeats=config.latency_repeats,
                                               threads=threads).items():
            times[name][key] = ms
    if int8:
        for name, ms in measure.tflite_latency(int8, repeats=config.latency_repeats,
                                               threads=config.tflite_threads).items():
            times[name]["int8_ms_batch1"] = ms
        x_test, y_test = data[4][:INT8_TEST], data[5][:INT8_TEST]
        for name, path in int8.items():
            outputs = measure.tflite_predict(path, x_test, threads=config.tflite_threads)
            times[name]["int8_accuracy"] = float(np.mean(np.argmax(outputs, -1) == y_test))
    log("LiteRT latency measured (float32" + (", int8)" if int8 else ")"))
    return times


def summarise(out, config, data=None, dataset="", log=print):
    """Measure and report the finished runs in `out` (module docstring); returns
    the summary dict. With `data` (`split_data`'s arrays) every model is also
    quantized to int8 and scored in LiteRT."""
    groups = group_runs(read_runs(out))
    if REFERENCE not in groups:
        raise ValueError(f"No finished baseline run in {out}: nothing to compare against.")
    representatives = {name: rows[0]["path"] for name, rows in groups.items()}
    times = _measure(representatives, out, config, log, data)
    models = {}
    for name, rows in groups.items():
        test = [r["test_accuracy"] for r in rows]
        val = [r["val_accuracy"] for r in rows]
        models[name] = dict(
            name=name, seeds=[r["seed"] for r in rows],
            accuracy=float(np.mean(test)), accuracy_std=_spread(test),
            val_accuracy=float(np.mean(val)), val_accuracy_std=_spread(val),
            conv_layers=float(np.mean([r["depth"] for r in rows])),
            params=float(np.mean([r.get("nonzero_params", r["params"]) for r in rows])),
            flops=float(np.mean([r["flops"] for r in rows])),
            path=rows[0]["path"], **times[name])
        models[name].setdefault("int8_ms_batch1", None)
        models[name].setdefault("int8_accuracy", None)
    final = choose_final(models, config.tolerance)
    recommended = os.path.join(out, "recommended")
    os.makedirs(recommended, exist_ok=True)
    for row in groups[final]:
        shutil.copy(os.path.join(out, row["path"]), recommended)
    summary = dict(dataset=dataset, final=final, reference=REFERENCE,
                   tolerance=config.tolerance,
                   models=[{k: models[n][k] for k in SUMMARY_FIELDS} for n in models])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = summary_markdown(summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    from tf_layersparse.experiments import report

    if report.plots_available():
        plot_pareto(summary, os.path.join(out, "pareto.png"))
    log("\n" + table)
    log(f"recommended: {final}")
    return summary


def summary_markdown(summary):
    """Markdown table of a summary: one line per model (mean ± spread over its
    seeds), speed-ups against the reference, the recommended model in bold.

    >>> row = dict(name="baseline", seeds=[0, 1], accuracy=0.9, accuracy_std=0.001,
    ...            val_accuracy=0.91, val_accuracy_std=0.002, conv_layers=3, params=100,
    ...            flops=2_000_000, latency_ms_batch1=2.0, latency_ms_batch64=10.0,
    ...            tflite_kb=4.0, tflite_ms_batch1=0.5, tflite_ms_batch1_1thread=0.6,
    ...            int8_ms_batch1=None, int8_accuracy=None, path="baseline_s0.keras")
    >>> print(summary_markdown(dict(dataset="d", final="baseline", models=[row])))
    | model | seeds | test accuracy (%) | validation (%) | conv/dense layers | params | MFLOPs | Keras ms b1 / b64 | speed-up b1 / b64 | LiteRT ms b1 (2 / 1 threads) | LiteRT speed-up | int8 ms b1 (speed-up) | int8 accuracy (%) |
    |---|---|---|---|---|---|---|---|---|---|---|---|---|
    | **baseline** | 2 | 90.00 ± 0.10 | 91.00 ± 0.20 | 3 | 100 | 2.00 | 2.00 / 10.00 | 1.00x / 1.00x | 0.500 / 0.600 | 1.00x | - | - |
    <BLANKLINE>
    """
    rows = summary["models"]
    ref = next((r for r in rows if r["name"] == REFERENCE), rows[0])
    lines = ["| model | seeds | test accuracy (%) | validation (%) | conv/dense layers | params "
             "| MFLOPs | Keras ms b1 / b64 | speed-up b1 / b64 | LiteRT ms b1 (2 / 1 threads) "
             "| LiteRT speed-up | int8 ms b1 (speed-up) | int8 accuracy (%) |",
             "|" + "---|" * 13]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] == summary["final"] else r["name"]
        lines.append(
            f"| {name} | {len(r['seeds'])} | {100 * r['accuracy']:.2f} ± "
            f"{100 * r['accuracy_std']:.2f} | {100 * r['val_accuracy']:.2f} ± "
            f"{100 * r['val_accuracy_std']:.2f} | {r['conv_layers']:.3g} | {r['params']:,.0f} | "
            f"{r['flops'] / 1e6:.2f} | {r['latency_ms_batch1']:.2f} / "
            f"{r['latency_ms_batch64']:.2f} | "
            f"{ref['latency_ms_batch1'] / r['latency_ms_batch1']:.2f}x / "
            f"{ref['latency_ms_batch64'] / r['latency_ms_batch64']:.2f}x | "
            f"{r['tflite_ms_batch1']:.3f} / {r['tflite_ms_batch1_1thread']:.3f} | "
            f"{ref['tflite_ms_batch1'] / r['tflite_ms_batch1']:.2f}x | {_int8(r, ref)} |")
    return "\n".join(lines) + "\n"


def _int8(row, ref):
    if row.get("int8_ms_batch1") is None:
        return "- | -"
    return (f"{row['int8_ms_batch1']:.3f} ({ref['int8_ms_batch1'] / row['int8_ms_batch1']:.2f}x)"
            f" | {100 * row['int8_accuracy']:.2f}")


def plot_pareto(summary, path):
    """Test accuracy (mean, spread as error bars) against Keras batch-1 latency,
    one labelled point per model, the Pareto front as a line; PNG at `path`."""
    from tf_layersparse.experiments.report import _pyplot

    plt = _pyplot()
    rows = sorted(summary["models"], key=lambda r: r["latency_ms_batch1"])
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    front, best = [], -1.0
    for r in rows:
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["latency_ms_batch1"] for r in front], [100 * r["accuracy"] for r in front],
            "-", color="0.7", zorder=0, label="Pareto front")
    for r in rows:
        final = r["name"] == summary["final"]
        ax.errorbar(r["latency_ms_batch1"], 100 * r["accuracy"], yerr=100 * r["accuracy_std"],
                    fmt="*" if final else "o", markersize=10 if final else 5, capsize=2)
        ax.annotate(r["name"], (r["latency_ms_batch1"], 100 * r["accuracy"]), fontsize=6,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("Keras compiled predict, batch 1 (ms, CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['dataset']}: accuracy vs latency (recommended: {summary['final']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
