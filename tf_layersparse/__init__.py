"""tf_layersparse: layer sparsity for Keras 3 (Hebiri & Lederer).

Regularize with `LayerSparsity`, watch layers switch off with
`ActiveLayers`, merge the inactive ones with `fold`, retrain with `refit`.
"""

# first: `python -m tf_layersparse.demo` imports this package before the
# demo, and TensorFlow logs while it loads (see `console`)
from tf_layersparse.console import quiet_if_entry_point

quiet_if_entry_point()
del quiet_if_entry_point

from tf_layersparse.analysis import (
    LayerReport,
    active_layer_count,
    layer_report,
    negative_part_norms,
    regularized_layers,
)
from tf_layersparse.callbacks import ActiveLayers
from tf_layersparse.cost import ModelCost, model_cost
from tf_layersparse.folding import FoldReport, compare_outputs, fold
from tf_layersparse.folding.eligibility import Eligibility, eligible_layers
from tf_layersparse.layers import BiasMap
from tf_layersparse.training import LayerSparseModel, apply_layer_sparsity
from tf_layersparse.refit import refit
from tf_layersparse.targets import DepthTarget, TargetProgress
from tf_layersparse.regularizers import (
    LayerSparsity,
    layer_sparsity_prox,
    negative_part_norm,
    snap_negative_part,
)

__version__ = "0.1.0"

__all__ = [
    "ActiveLayers",
    "BiasMap",
    "Eligibility",
    "FoldReport",
    "LayerReport",
    "LayerSparseModel",
    "LayerSparsity",
    "ModelCost",
    "active_layer_count",
    "apply_layer_sparsity",
    "DepthTarget",
    "TargetProgress",
    "compare_outputs",
    "eligible_layers",
    "fold",
    "layer_report",
    "layer_sparsity_prox",
    "model_cost",
    "negative_part_norm",
    "negative_part_norms",
    "refit",
    "regularized_layers",
    "snap_negative_part",
]
