"""Keras compiled-predict latency of a convnet study's models on this process's backend.

    KERAS_BACKEND=jax python benchmarks/study_latency.py docs/results/convnet_study/fashion_mnist_mobilenet
    KERAS_BACKEND=torch python benchmarks/study_latency.py OUT

Reads `OUT/summary.json` (written on TensorFlow by the study), loads each
model's `.keras` file, and times `predict_on_batch` at batch 1 and 64,
alternating the models round by round in this one process (median ms per
batch). Prints a markdown table with the speed-ups against the BN-fused
baseline and writes it to `OUT/latency_<backend>.md`.
"""

import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a convnet study's output folder")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import keras

    from tf_layersparse.experiments import convnet_measure as measure

    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    models = {m["name"]: keras.saving.load_model(os.path.join(args.out, m["path"]))
              for m in summary["models"]}
    times = {batch: measure.keras_latency(models, batch, repeats=args.repeats,
                                          number=5 if batch == 1 else 2)
             for batch in (1, 64)}
    ref = summary["reference"]
    lines = [f"Keras {keras.backend.backend()}, compiled predict_on_batch, median ms "
             f"({args.repeats} alternating rounds)", "",
             "| model | ms b1 | ms b64 | speed-up b1 / b64 |", "|---|---|---|---|"]
    for name in models:
        b1, b64 = times[1][name], times[64][name]
        lines.append(f"| {name} | {b1:.3f} | {b64:.2f} | {times[1][ref] / b1:.2f}x / "
                     f"{times[64][ref] / b64:.2f}x |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"latency_{keras.backend.backend()}.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
