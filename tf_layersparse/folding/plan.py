"""Decide what folding does to every layer, without building anything.

Two passes over the normalised graph (see `ops.py`):

1. Track which tensors are provably >= 0. An activation that is the identity
   on [0, inf) and reads such a tensor is removed, as is every identity at
   inference. An affine op is *inactive* when its input is >= 0 and its
   kernel and bias have no negative entry: its output is then >= 0 as well,
   so the ReLU after it goes, and chains of inactive layers follow.
2. Merge every affine op into the affine op that now reads its output
   directly, when that is exact, the tensor has no other reader and is no
   model output, and the policy allows it.
"""

import dataclasses
import itertools
from typing import Optional

import keras
import numpy as np

from tf_layersparse.folding import merge as merge_lib
from tf_layersparse.folding.ops import (
    Op,
    affine_weights,
    ends_in_nonnegative_activation,
    keeps_nonnegative,
    node_ops,
)
from tf_layersparse.graph import model_graph
from tf_layersparse.regularizers import LayerSparsity

__all__ = ["FoldPlan", "LayerReport", "LayerStatus", "nonnegative_tensors", "plan_fold", "POLICIES"]

POLICIES = ("depth", "cost")


@dataclasses.dataclass
class LayerStatus:
    """What folding does with one layer, and why."""

    name: str
    class_name: str
    action: str  # "merged", "removed", "removed-activation" or "kept"
    reason: str
    merged_into: Optional[str] = None
    regularized: bool = False
    negative_norm: Optional[float] = None
    input_nonnegative: Optional[bool] = None

    @property
    def active(self):
        """True if the layer's kernel or bias has a negative entry."""
        if self.negative_norm is None:
            return None
        return self.negative_norm > 0

    @property
    def foldable(self):
        return self.action != "kept"


class LayerReport(list):
    """A list of `LayerStatus` records that prints as a table."""

    def __str__(self):
        lines = [f"{'layer':24} {'class':20} {'neg. norm':>10}  action"]
        for s in self:
            norm = "" if s.negative_norm is None else f"{s.negative_norm:.4g}"
            lines.append(
                f"{s.name:24} {s.class_name:20} {norm:>10}  {s.action}: {s.reason}"
            )
        return "\n".join(lines)


@dataclasses.dataclass
class FoldPlan:
    graph: object
    ops: list  # every op, in topological order
    kept: list  # ops that survive, merged ones standing for their members
    alias: dict  # tensor key of a removed op -> key that replaces it
    merges: list  # (target name, [member names])
    skipped: list  # (first name, second name, reason)
    statuses: dict  # layer name -> LayerStatus
    nonnegative: dict  # tensor key -> provably >= 0
    approximate: list = dataclasses.field(default_factory=list)  # inexact merges

    def resolve(self, key):
        while key in self.alias:
            key = self.alias[key]
        return key


def _is_regularized(layer):
    return any(
        isinstance(getattr(layer, attr, None), LayerSparsity)
        for attr in ("kernel_regularizer", "bias_regularizer")
    )


def negative_norm(kernel, bias):
    """Norm of the negative part of a layer's kernel and bias together."""
    return float(
        np.sqrt(
            np.sum(np.minimum(kernel, 0) ** 2) + np.sum(np.minimum(bias, 0) ** 2)
        )
    )


def _check_finite(graph):
    for node in graph.nodes:
        for variable in getattr(node.layer, "weights", []):
            value = keras.ops.convert_to_numpy(variable)
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise ValueError(
                    f"Layer '{node.layer.name}' has non-finite values "
                    f"(NaN or inf) in weight '{variable.path}'; refusing to "
                    "fold a model whose outputs are undefined."
                )


def _normalise(graph):
    uses = graph.layer_uses()
    shapes = {k: spec[1] for k, spec in zip(graph.inputs, graph.input_specs)}
    for node in graph.nodes:
        shapes.update(zip(node.outputs, node.shapes))
    keys = itertools.count(-1, -1)
    ops, opaque_reasons = [], {}
    for node in graph.nodes:
        layer = node.layer
        if uses[id(layer)] > 1:
            opaque_reasons[layer.name] = (
                f"shared layer (called {uses[id(layer)]} times)"
            )
            ops.append(Op("opaque", node, list(node.inputs), None))
        elif isinstance(layer, keras.Model):
            opaque_reasons[layer.name] = (
                "nested model; fold it separately and rebuild"
            )
            ops.append(Op("opaque", node, list(node.inputs), None))
        else:
            in_shape = shapes.get(node.inputs[0]) if node.inputs else None
            ops.extend(node_ops(node, in_shape, lambda: next(keys)))
    return ops, opaque_reasons


def _fold_batchnorm(graph, ops):
    """Fold inference-form BatchNormalization into the affine op before it."""
    alias, removed = {}, {}
    readers = {}
    for op in ops:
        for key in op.inputs:
            readers[key] = readers.get(key, 0) + 1
    outputs = set(graph.outputs)
    producers = {op.output: op for op in ops if op.kind == "affine"}
    for op in ops:
        if op.kind == "affine":
            op.effective = (op.kernel, op.bias)
        if op.kind != "batchnorm":
            continue
        layer, key = op.layer, op.inputs[0]
        prev = producers.get(key)
        rank = len(prev.output_shape) if prev is not None else None
        if (
            prev is None
            or readers.get(key) != 1
            or key in outputs
            or layer.axis not in (-1, rank - 1)
        ):
            continue
        value = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
        mean, var = value(layer.moving_mean), value(layer.moving_variance)
        gamma = value(layer.gamma) if layer.gamma is not None else np.ones_like(mean)
        beta = value(layer.beta) if layer.beta is not None else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + layer.epsilon)
        prev.kernel = prev.kernel * scale
        prev.bias = (prev.bias - mean) * scale + beta
        prev.effective = (prev.kernel, prev.bias)
        alias[op.output] = key
        removed[id(op)] = f"BatchNormalization folded into '{prev.name}' (inference form)"
    return alias, removed


def _nonnegativity_pass(graph, ops, nonnegative_inputs, alias=None, removed=None):
    nonneg = {k: bool(flag) for k, flag in zip(graph.inputs, nonnegative_inputs)}
    alias, removed = dict(alias or {}), dict(removed or {})
    for op in ops:
        if id(op) in removed:  # folded BatchNormalization
            nonneg[op.output] = nonneg.get(op.inputs[0], False)
            continue
        inputs_ok = [nonneg.get(k, False) for k in op.inputs]
        if op.kind == "identity":
            alias[op.output] = op.inputs[0]
            nonneg[op.output] = inputs_ok[0]
            removed[id(op)] = "identity at inference"
        elif op.kind == "activation":
            spec = op.activation
            if spec.identity or (spec.identity_on_nonnegative and inputs_ok[0]):
                alias[op.output] = op.inputs[0]
                nonneg[op.output] = inputs_ok[0]
                removed[id(op)] = (
                    f"'{spec.name}' is the identity on its input "
                    + ("" if spec.identity else "(>= 0)")
                ).strip()
            else:
                nonneg[op.output] = spec.nonnegative_output
        elif op.kind == "affine":
            nonneg[op.output] = bool(
                inputs_ok[0] and op.kernel.min() >= 0 and op.bias.min() >= 0
            )
        else:
            ok = bool(op.inputs) and all(inputs_ok) and keeps_nonnegative(op.layer)
            ok = ok or ends_in_nonnegative_activation(op.layer)
            for key in op.node.outputs:
                nonneg[key] = ok
    return nonneg, alias, removed


def _cost_reason(parts, merged, output_shape):
    before = [sum(c) for c in zip(*(merge_lib.op_cost(op) for op in parts))]
    after = merge_lib.affine_cost(
        merged.kernel.shape, output_shape,
        any(merge_lib.has_bias(op) for op in parts),
    )
    if after[0] > before[0] or after[1] > before[1]:
        return (
            "cost policy: merging would grow parameters "
            f"{before[0]} -> {after[0]}, FLOPs {before[1]} -> {after[1]}"
        )
    return None


def _boundary_reason(prev, key, readers, output_keys):
    if key in output_keys:
        return f"output of '{prev.name}' is a model output"
    if readers.get(key, 0) > 1:
        return f"output of '{prev.name}' feeds {readers[key]} layers"
    return None


def _through_flatten(op, producers, affine_by_output):
    """(conv op, Flatten op) when `op` is a Dense reading Flatten(conv)."""
    flatten = producers.get(op.inputs[0])
    if (
        type(op.template).__name__ != "Dense"
        or flatten is None
        or type(flatten.layer) is not keras.layers.Flatten
        or len(flatten.inputs) != 1
    ):
        return None
    conv = affine_by_output.get(flatten.inputs[0])
    if conv is None or type(conv.template).__name__ == "Dense":
        return None
    return conv, flatten


def _absorb(op, prev, merged):
    op.kernel, op.bias = merged.kernel, merged.bias
    op.template, op.overrides = merged.template, merged.overrides
    op.exact = prev.exact and op.exact and merged.exact
    if "padding" in merged.overrides:
        o = merged.overrides
        op.geometry = (o["padding"], o["strides"], o["dilation_rate"])
    op.members = prev.members + op.members


def _merge_pass(ops, removed, resolve, output_keys, policy, approximate):
    kept = [op for op in ops if id(op) not in removed]
    for op in kept:
        op.inputs = [resolve(k) for k in op.inputs]
    readers = {}
    for op in kept:
        for key in op.inputs:
            readers[key] = readers.get(key, 0) + 1
    producers = {
        key: op for op in kept if op.kind == "opaque" for key in op.node.outputs
    }
    affine_by_output, absorbed, skipped, alias = {}, {}, [], {}
    for op in kept:
        if op.kind != "affine":
            continue
        key = op.inputs[0]
        prev = affine_by_output.get(key)
        via = _through_flatten(op, producers, affine_by_output)
        if prev is None and via is None:
            affine_by_output[op.output] = op
            continue
        if via is not None:
            prev, flatten = via
            reason = _boundary_reason(prev, flatten.inputs[0], readers, output_keys)
            reason = reason or _boundary_reason(flatten, key, readers, output_keys)
        else:
            reason = _boundary_reason(prev, key, readers, output_keys)
        merged = None
        if reason is None:
            try:
                if via is not None:
                    merged = merge_lib.merge_through_flatten(prev, flatten.layer, op)
                else:
                    merged = merge_lib.merge_affine(prev, op, approximate)
            except merge_lib.CannotMerge as error:
                reason = str(error)
        if reason is None and policy == "cost":
            reason = _cost_reason([prev, op], merged, op.output_shape)
        if reason is None:
            _absorb(op, prev, merged)
            if via is not None:
                # Flatten now reads the convolution's input
                alias[flatten.inputs[0]] = prev.inputs[0]
                flatten.inputs = list(prev.inputs)
                op.input_shape = (None, merged.kernel.shape[0])
            else:
                op.inputs = list(prev.inputs)
                op.input_shape = prev.input_shape
            absorbed[id(prev)] = op
        else:
            skipped.append((prev.name, op.name, reason))
        affine_by_output[op.output] = op
    # an op absorbed into a later one may itself have absorbed earlier ones
    kept = [op for op in kept if id(op) not in absorbed]
    return kept, skipped, readers, alias


def _statuses(graph, ops, removed, plan, readers, output_keys, opaque_reasons):
    statuses = {}
    merged_into = {
        layer.name: op.name
        for op in plan.kept
        if op.kind == "affine"
        for layer in op.members[:-1]
    }
    skip_reason = {first: reason for first, _, reason in plan.skipped}
    ops_by_node = {}
    for op in ops:
        ops_by_node.setdefault(id(op.node), []).append(op)

    for node in graph.nodes:
        layer = node.layer
        if layer.name in statuses:
            continue
        node_ops_ = ops_by_node[id(node)]
        first = node_ops_[0]
        status = LayerStatus(layer.name, type(layer).__name__, "kept", "")
        statuses[layer.name] = status
        unfolded_batchnorm = first.kind == "batchnorm" and id(first) not in removed
        if first.kind == "opaque" or unfolded_batchnorm:
            default = "not foldable: no merge rule for this layer type"
            if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                                  keras.layers.DepthwiseConv1D, keras.layers.SeparableConv1D)):
                default = ("not foldable: depthwise/separable convolutions are not "
                           "supported (merging would make them dense convolutions)")
            if isinstance(layer, keras.layers.BatchNormalization):
                default = "not right after a linear Dense/Conv it could fold into"
            status.reason = opaque_reasons.get(layer.name, default)
            continue
        if first.kind in ("identity", "batchnorm") and id(first) in removed:
            status.action, status.reason = "removed", removed[id(first)]
            continue
        if first.kind == "activation":
            if id(first) in removed:
                status.action, status.reason = "removed", removed[id(first)]
            else:
                status.reason = _kept_activation_reason(first, plan.nonnegative)
            continue
        # affine layer
        status.regularized = _is_regularized(layer)
        status.negative_norm = negative_norm(*first.effective)
        status.input_nonnegative = plan.nonnegative.get(node.inputs[0], False)
        if layer.name in merged_into:
            status.action = "merged"
            status.merged_into = merged_into[layer.name]
            status.reason = f"merged into '{status.merged_into}'"
            continue
        act = node_ops_[1] if len(node_ops_) > 1 else None
        if act is not None and id(act) not in removed:
            status.reason = _kept_activation_reason(act, plan.nonnegative)
            continue
        if layer.name in skip_reason:  # its output met the next layer directly
            reason = skip_reason[layer.name]
        else:
            key = plan.resolve(node.outputs[0])
            if key in output_keys:
                reason = "its output is a model output"
            elif readers.get(key, 0) > 1:
                reason = f"its output feeds {readers[key]} layers"
            else:
                reason = "the next layer is not an affine layer it can merge into"
        if act is not None:  # its built-in activation goes, the layer stays
            status.action = "removed-activation"
            status.reason = f"activation removed; not merged: {reason}"
        else:
            status.reason = f"not merged: {reason}"
    return statuses


def _kept_activation_reason(act, nonnegative):
    spec = act.activation
    if not spec.identity_on_nonnegative:
        return f"activation '{spec.name}' is not the identity on [0, inf)"
    source = act.inputs[0]
    if not nonnegative.get(source, False):
        producer = act.node.layer
        if act.inline:
            kernel, bias = affine_weights(producer)
            norm = negative_norm(kernel, bias)
            if kernel.min() < 0 or bias.min() < 0:
                return f"active: negative part norm {norm:.4g}"
        return "input may be negative"
    return "kept"


def _normalise_flags(graph, nonnegative_inputs):
    n = len(graph.inputs)
    if isinstance(nonnegative_inputs, (list, tuple)):
        if len(nonnegative_inputs) != n:
            raise ValueError(
                f"`nonnegative_inputs` has {len(nonnegative_inputs)} entries "
                f"but model '{graph.name}' has {n} inputs."
            )
        return [bool(f) for f in nonnegative_inputs]
    return [bool(nonnegative_inputs)] * n


def plan_fold(model, nonnegative_inputs=False, policy="depth", approximate=False):
    """Work out what `fold` would do to `model`; see `FoldPlan`."""
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
    graph = model_graph(model)
    _check_finite(graph)
    flags = _normalise_flags(graph, nonnegative_inputs)
    ops, opaque_reasons = _normalise(graph)
    bn_alias, bn_removed = _fold_batchnorm(graph, ops)
    nonneg, alias, removed = _nonnegativity_pass(graph, ops, flags, bn_alias, bn_removed)
    plan = FoldPlan(graph, ops, [], alias, [], [], {}, nonneg)
    output_keys = {plan.resolve(k) for k in graph.outputs}
    kept, skipped, readers, merge_alias = _merge_pass(
        ops, removed, plan.resolve, output_keys, policy, approximate
    )
    plan.kept, plan.skipped = kept, skipped
    plan.alias.update(merge_alias)
    plan.approximate = [op.name for op in kept if op.kind == "affine" and not op.exact]
    plan.merges = [
        (op.name, [layer.name for layer in op.members])
        for op in kept
        if op.kind == "affine" and len(op.members) > 1
    ]
    plan.statuses = _statuses(
        graph, ops, removed, plan, readers, output_keys, opaque_reasons
    )
    return plan


def nonnegative_tensors(model, nonnegative_inputs=False, graph=None):
    """`{tensor key of model_graph(model): provably >= 0}`."""
    del graph  # the plan builds its own view
    return plan_fold(model, nonnegative_inputs=nonnegative_inputs).nonnegative
