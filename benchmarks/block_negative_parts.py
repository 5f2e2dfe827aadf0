"""Where a saved model's penalised groups are still negative: kernel or bias.

    python benchmarks/block_negative_parts.py MODEL.keras

For each penalised group (a layer, or a Conv/Dense -> BatchNormalization
block) prints the norm of the negative part of its effective kernel(s) and,
for blocks, of its effective bias `beta + s * (b - mean)` under the moving
statistics. A block is inactive when both are exactly 0. Used to see why
blocks stay active at the end of a decayed-rate run (docs/RESULTS.md).
"""

import sys

import keras
import numpy as np

from tf_layersparse.proximal import sparsity_groups


def negative_norm(tensors):
    return float(np.sqrt(sum(np.sum(np.minimum(np.asarray(t), 0.0) ** 2) for t in tensors)))


def rows(model):
    """(layer, kernel negative norm, bias negative norm or None, BN name or None)."""
    found = []
    for group in sparsity_groups(model):
        weights = group.effective_weights()
        if group.batchnorm is None:
            found.append((group.layer.name, negative_norm(weights), None, None))
        else:
            found.append((group.layer.name, negative_norm(weights[:-1]),
                          negative_norm(weights[-1:]), group.batchnorm.name))
    return found


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    model = keras.saving.load_model(argv[0])
    print("| group | batch norm | kernel negative norm | effective bias negative norm |")
    print("|---|---|---|---|")
    for name, kernel, bias, bn in rows(model):
        bias_text = "-" if bias is None else f"{bias:.3e}"
        print(f"| {name} | {bn or '-'} | {kernel:.3e} | {bias_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
