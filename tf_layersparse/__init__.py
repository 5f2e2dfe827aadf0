"""tf_layersparse: layer sparsity for Keras 3 (Hebiri & Lederer).

Regularize with `LayerSparsity`, watch layers switch off with
`ActiveLayers`, merge the inactive ones with `fold`, retrain with `refit`.
"""

from tf_layersparse.folding import FoldReport, compare_outputs, fold
from tf_layersparse.regularizers import (
    LayerSparsity,
    layer_sparsity_prox,
    negative_part_norm,
    snap_negative_part,
)
from tf_layersparse.cost import ModelCost, model_cost

__version__ = "0.1.0"

__all__ = [
    "FoldReport",
    "LayerSparsity",
    "ModelCost",
    "compare_outputs",
    "fold",
    "layer_sparsity_prox",
    "model_cost",
    "negative_part_norm",
    "snap_negative_part",
]
