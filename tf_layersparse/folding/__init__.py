"""Fold inactive layers away: `fold(model)` returns a shallower, equal model.

Modules: `passes` (normalised graph, BatchNormalization blocks,
non-negativity), `merge` (pure merge math), `plan` (which layers merge),
`rebuild` (plan -> new model), `report` (statuses), `api` (`fold` and its
self-check), `eligibility` (which layers the penalty applies to). The
knowledge of each layer type lives in `tf_layersparse.registry`.
"""

from tf_layersparse.folding.api import compare_outputs, fold, probe_inputs
from tf_layersparse.folding.eligibility import Eligibility, eligible_layers
from tf_layersparse.folding.plan import POLICIES, FoldPlan, plan_fold
from tf_layersparse.folding.report import FoldReport, LayerReport, LayerStatus
from tf_layersparse.registry import Rule, register

__all__ = [
    "Eligibility",
    "FoldPlan",
    "FoldReport",
    "LayerReport",
    "LayerStatus",
    "POLICIES",
    "Rule",
    "compare_outputs",
    "eligible_layers",
    "fold",
    "plan_fold",
    "probe_inputs",
    "register",
]
