"""What folding did to each layer, and why: `LayerStatus`, `FoldReport`."""

import dataclasses
from typing import Optional

from tf_layersparse import registry
from tf_layersparse.regularizers import LayerSparsity

__all__ = ["FoldReport", "LayerReport", "LayerStatus", "statuses"]


@dataclasses.dataclass
class LayerStatus:
    """What folding does with one layer, and why.

    `block` names a block's affine layer, BatchNormalization and activation
    together (None for a layer outside a block).
    """

    name: str
    class_name: str
    action: str  # "merged", "removed", "removed-activation" or "kept"
    reason: str
    merged_into: Optional[str] = None
    regularized: bool = False
    negative_norm: Optional[float] = None
    input_nonnegative: Optional[bool] = None
    block: Optional[tuple] = None

    @property
    def active(self):
        """True if the (effective) kernel or bias has a negative entry."""
        if self.negative_norm is None:
            return None
        return self.negative_norm > 0

    @property
    def foldable(self):
        return self.action != "kept"


class LayerReport(list):
    """A list of `LayerStatus` records that prints as a table.

    Example:

    >>> print(LayerReport([LayerStatus("d", "Dense", "kept", "output")]))
    ... # doctest: +NORMALIZE_WHITESPACE
    layer   class   neg. norm  action
    d       Dense              kept: output
    """

    def __str__(self):
        width = max([5] + [len(s.name) for s in self]) + 2
        cls = max([5] + [len(s.class_name) for s in self]) + 2
        lines = [f"{'layer':{width}}{'class':{cls}}{'neg. norm':>10}  action"]
        for s in self:
            norm = "" if s.negative_norm is None else f"{s.negative_norm:.4g}"
            lines.append(f"{s.name:{width}}{s.class_name:{cls}}{norm:>10}  {s.action}: {s.reason}")
        return "\n".join(lines)


def _is_regularized(layer):
    return any(isinstance(getattr(layer, attr, None), LayerSparsity)
               for attr in ("kernel_regularizer", "bias_regularizer",
                            "depthwise_regularizer", "pointwise_regularizer"))


def _activation_reason(step, nonnegative, affine_step=None):
    rule = step.activation
    if rule.capped:
        return (f"activation '{rule.name}' is capped: the identity only on [0, cap], "
                "which fold cannot prove its input stays in")
    if not rule.identity_on_nonnegative:
        return f"activation '{rule.name}' is not the identity on [0, inf)"
    if affine_step is not None and not affine_step.affine.nonnegative():
        return f"active: negative part norm {affine_step.affine.negative_norm():.4g}"
    if not nonnegative.get(step.inputs[0], False):
        return "input may be negative"
    return "reverted: the self-check found removing it wrong"


def _block_of(step, steps_by_node, all_steps):
    """(affine, BN, activation) names when `step` heads a block."""
    if step.batchnorm is None:
        return None
    bn_out = None
    for other in all_steps:
        if other.kind == registry.BATCHNORM and other.layer is step.batchnorm:
            bn_out = other.outputs[0]
    act = next((s.name for s in all_steps if s.kind == registry.ACTIVATION
                and s.node.inputs == [bn_out]), None) if bn_out is not None else None
    return (step.name, step.batchnorm.name, act)


def statuses(graph, steps, removed, plan, readers, output_keys):
    """`{layer name: LayerStatus}` for every layer of the graph."""
    result = {}
    merged_into = {s.name: seg.last.name for seg in plan.segments.values()
                   for s in seg.steps[:-1]}
    skip_reason = {first: reason for first, _, reason in plan.skipped}
    by_node = {}
    for step in steps:
        by_node.setdefault(id(step.node), []).append(step)
    block_of_bn = {}
    for step in steps:
        if step.kind == registry.AFFINE and step.batchnorm is not None:
            block_of_bn[step.batchnorm.name] = _block_of(step, by_node, steps)
    block_of_act = {b[2]: b for b in block_of_bn.values() if b[2]}
    for node in graph.nodes:
        layer = node.layer
        if layer.name in result:
            continue
        first = by_node[id(node)][0]
        status = LayerStatus(layer.name, type(layer).__name__, "kept", "")
        result[layer.name] = status
        if first.kind == registry.AFFINE:
            _affine_status(status, first, by_node[id(node)], removed, plan, readers,
                           output_keys, merged_into, skip_reason)
            status.block = _block_of(first, by_node, steps)
            if status.block:
                status.reason = f"block {' + '.join(n for n in status.block if n)}: {status.reason}"
            continue
        block = block_of_bn.get(layer.name) or block_of_act.get(layer.name)
        if id(first) in removed:
            status.action, status.reason = "removed", removed[id(first)]
        elif first.kind == registry.ACTIVATION:
            status.reason = _activation_reason(first, plan.nonnegative)
        elif first.kind == registry.BATCHNORM:
            status.reason = "not right after a linear Dense/Conv it could fold into"
        elif first.kind in (registry.OPAQUE, registry.PASSTHROUGH, registry.BIAS_MAP):
            status.reason = first.reason or "carried over: not an affine layer"
            if first.kind == registry.OPAQUE:
                status.reason = f"not foldable: {status.reason}"
        else:
            status.reason = "kept"
        if block:
            status.block = block
            status.reason = f"block {' + '.join(n for n in block if n)}: {status.reason}"
    return result


def _affine_status(status, first, node_steps, removed, plan, readers, output_keys,
                   merged_into, skip_reason):
    layer = first.layer
    status.regularized = _is_regularized(layer)
    status.negative_norm = first.affine.negative_norm()
    status.input_nonnegative = plan.nonnegative.get(first.node.inputs[0], False)
    if layer.name in merged_into:
        status.action, status.merged_into = "merged", merged_into[layer.name]
        status.reason = f"merged into '{status.merged_into}'"
        return
    act = node_steps[1] if len(node_steps) > 1 else None
    if act is not None and id(act) not in removed:
        status.reason = _activation_reason(act, plan.nonnegative, first)
        return
    seg = plan.segments.get(id(first))
    if seg is not None and (len(seg.steps) > 1 or seg.residual is not None):
        absorbed = [s.name for s in seg.steps[:-1]] + (
            [seg.residual.name] if seg.residual is not None else [])
        reason = "absorbed " + ", ".join(f"'{n}'" for n in absorbed) + f" ({seg.route})"
    elif layer.name in skip_reason:
        reason = f"not merged: {skip_reason[layer.name]}"
    else:
        key = plan.resolve(first.outputs[0])
        if key in output_keys:
            reason = "not merged: its output is a model output"
        elif readers.get(key, 0) > 1:
            reason = f"not merged: its output feeds {readers[key]} layers"
        else:
            reason = "not merged: the next layer is not an affine layer it can merge into"
    if act is not None:
        status.action = "removed-activation"
        status.reason = f"activation removed; {reason}"
    else:
        status.reason = reason


@dataclasses.dataclass
class FoldReport:
    """What `fold` did: per-layer statuses, merges, sizes, measured error.

    `verification` maps each output name to `(max_abs_error,
    max_rel_error)`, the relative error being the largest absolute error
    divided by the largest absolute output of the original model;
    `reverted` lists decisions the self-check undid; `approximate` the
    merged layers that differ at 'same' borders, whose measured error is
    `approximate_error`; `routes` maps each merged layer to how it was
    merged: "exact", "exact, bias map" (a position-dependent bias at the
    borders, held by a `BiasMap` layer after it) or "approximate".
    """

    layers: list
    merges: list
    skipped: list
    before: object
    after: object
    verification: Optional[dict] = None
    approximate: list = dataclasses.field(default_factory=list)
    reverted: list = dataclasses.field(default_factory=list)
    approximate_error: Optional[float] = None
    routes: dict = dataclasses.field(default_factory=dict)

    @property
    def exact(self):
        """False if any merge is only approximate ('same' padding borders)."""
        return not self.approximate

    @property
    def max_relative_error(self):
        if not self.verification:
            return None
        return max(rel for _, rel in self.verification.values())

    def __str__(self):
        lines = [f"before: {self.before}", f"after:  {self.after}"]
        if self.merges:
            lines.append("merges:")
            lines += [f"  {' + '.join(m)} -> {t}"
                      + (f" ({self.routes[t]})" if t in self.routes else "")
                      for t, m in self.merges]
        lines.append(str(LayerReport(self.layers)))
        if self.approximate:
            lines.append("approximate merges ('same' borders): " + ", ".join(self.approximate))
        if self.reverted:
            lines.append("reverted by the self-check: " + ", ".join(map(str, self.reverted)))
        for name, (abs_err, rel_err) in (self.verification or {}).items():
            lines.append(f"check {name}: max abs error {abs_err:.3g}, "
                         f"max rel error {rel_err:.3g}")
        return "\n".join(lines)
