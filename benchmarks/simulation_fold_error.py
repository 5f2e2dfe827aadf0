"""Where the one fold error above 1e-5 in the simulation study comes from.

    python benchmarks/simulation_fold_error.py     # ~1 minute on 2 cores

`fold`'s verification divides the largest absolute output difference by the
largest absolute output of the original. A 26-layer SLS network that did not
train predicts about 0 (the mean of the standardised y), so that scale is
tiny and float32 rounding alone can exceed 1e-5 of it. This script retrains
the network that `python -m tf_layersparse.experiments simulation
--strength-scale 2` flagged (l-1 = 25, s_W = 0.1, run 13) and compares the
original float32 model and its fold with a float64 evaluation of the
original's weights.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tf_layersparse as ls  # noqa: E402
from tf_layersparse.experiments import simulation_study as study  # noqa: E402

RUNS, RUN = 30, 13


def float64_outputs(weights, x):
    h = x.astype(np.float64)
    for kernel, bias in zip(weights[:-2:2], weights[1:-2:2]):
        h = np.maximum(h @ kernel.astype(np.float64) + bias, 0.0)
    return h @ weights[-2].astype(np.float64) + weights[-1]


def main():
    setting = study.settings_for([25], [0.1], strength_scale=2)[0]
    # the same data and batch of LS, SLS and ILS networks as the study trains
    datasets, _, net, mse = study._ls_sls_ils(setting, RUNS, seed=0, penalty_group="layer")
    model = net.to_keras(RUNS + RUN)
    x = datasets[RUN].x_test.astype("float32")
    folded, report = ls.fold(model, verify=x, return_report=True)
    exact = float64_outputs(model.get_weights(), x)
    scale = np.abs(exact).max()

    def rel(outputs):
        return np.abs(np.asarray(outputs, np.float64) - exact).max() / scale

    print(f"SLS network, l-1=25, s_W=0.1, run {RUN}: test mse {mse[RUNS + RUN]:.3f}, "
          f"{ls.model_cost(model).depth} -> {ls.model_cost(folded).depth} layers")
    print(f"outputs in [{exact.min():.3g}, {exact.max():.3g}]")
    print(f"fold report, folded vs original float32: {report.max_relative_error:.3g}")
    print(f"original float32 vs float64:             {rel(model(x)):.3g}")
    print(f"folded float32 vs float64 original:      {rel(folded(x)):.3g}")


if __name__ == "__main__":
    main()
