"""The normalised graph and the passes that need no merging.

Every graph node becomes one `Step` per the rule registry: an affine map
(a layer's built-in activation split off into its own step), a
BatchNormalization, an activation, an identity at inference, a layer that
keeps inputs >= 0, or an opaque step that folding carries over as it is.
Two passes follow: BatchNormalization folds into the affine layer before
it (a *block*), and a non-negativity pass proves which tensors are >= 0,
removing every activation that is then the identity on its input.

Decisions are named by `Decision` keys so that `fold` can forbid one (and
plan again) when its self-check finds the result wrong.
"""

import dataclasses
import itertools
from typing import Optional

import keras
import numpy as np

from tf_layersparse import registry
from tf_layersparse.folding.merge import Affine, fold_batchnorm
from tf_layersparse.graph import Ref

__all__ = ["Step", "block_batchnorm", "nonnegativity", "normalise", "nonnegative_flags"]


@dataclasses.dataclass
class Step:
    """One step of the normalised graph; `kind` is a registry kind."""

    kind: str
    node: object
    inputs: list
    outputs: list
    affine: Optional[Affine] = None
    activation: Optional[registry.ActivationRule] = None
    inline: bool = False
    reason: str = ""
    batchnorm: object = None  # BatchNormalization layer folded in (a block)

    @property
    def layer(self):
        return self.node.layer

    @property
    def name(self):
        return self.node.layer.name


def _plain_call(node):
    """One tensor in, one out, no argument that changes the function."""
    extra = {k: v for k, v in node.kwargs.items()
             if v is not None and (k != "training" or v is True)}
    return (len(node.outputs) == 1 and len(node.inputs) == 1 and len(node.args) == 1
            and isinstance(node.args[0], Ref) and not extra)


def _affine_of(layer):
    form, kernel, pointwise, bias = registry.read_affine_weights(layer)
    return Affine(form, kernel, bias, pointwise, registry.affine_geometry(layer),
                  groups=getattr(layer, "groups", 1) if form == "conv" else 1,
                  channels_first=registry.channel_axis(layer) == 1)


def _node_steps(node, uses, new_key):
    layer = node.layer
    if uses.get(id(layer), 1) > 1:
        return [Step(registry.OPAQUE, node, list(node.inputs), list(node.outputs),
                     reason=f"shared layer (called {uses[id(layer)]} times)")]
    rule = registry.rule_for(layer, node)
    kind = rule.kind
    if kind in (registry.AFFINE, registry.BATCHNORM, registry.ACTIVATION,
                registry.IDENTITY) and not _plain_call(node):
        return [Step(registry.OPAQUE, node, list(node.inputs), list(node.outputs),
                     reason="called with several tensors or extra arguments")]
    if kind == registry.AFFINE:
        inline = registry.activation_rule(registry.activation_name(layer))
        affine = Step(kind, node, list(node.inputs),
                      [node.outputs[0] if inline.linear else new_key()],
                      affine=_affine_of(layer))
        if inline.linear:
            return [affine]
        return [affine, Step(registry.ACTIVATION, node, list(affine.outputs),
                             list(node.outputs), activation=inline, inline=True)]
    return [Step(kind, node, list(node.inputs), list(node.outputs),
                 activation=rule.activation, reason=rule.reason)]


def normalise(graph):
    """The graph's `Step`s in topological order."""
    uses = graph.layer_uses()
    keys = itertools.count(-1, -1)
    steps = []
    for node in graph.nodes:
        steps.extend(_node_steps(node, uses, lambda: next(keys)))
    return steps


def _readers(steps):
    readers = {}
    for step in steps:
        for key in step.inputs:
            readers[key] = readers.get(key, 0) + 1
    return readers


def block_batchnorm(graph, steps, allowed):
    """Fold each BatchNormalization into the affine step before it.

    Returns `(alias, removed)`: BN output key -> affine output key, and
    `{id(step): reason}` for the folded BN steps. A BN folds when it
    normalises that layer's channel axis, is the only reader of its output,
    which is no model output, and `allowed(("batchnorm", name))`.
    """
    alias, removed = {}, {}
    readers = _readers(steps)
    outputs = set(graph.outputs)
    producers = {step.outputs[0]: step for step in steps if step.kind == registry.AFFINE}
    for step in steps:
        if step.kind != registry.BATCHNORM:
            continue
        key = step.inputs[0]
        prev = producers.get(key)
        if (prev is None or readers.get(key) != 1 or key in outputs
                or not registry.batchnorm_on_channels(step.layer, prev.layer,
                                                      prev.node.shapes[0])
                or not allowed(("batchnorm", step.name))):
            continue
        prev.affine = fold_batchnorm(prev.affine, *registry.batchnorm_scale_shift(step.layer))
        prev.batchnorm = step.layer
        alias[step.outputs[0]] = key
        removed[id(step)] = f"BatchNormalization folded into '{prev.name}' (inference form)"
    return alias, removed


def _nonnegative_activation_of(layer):
    """True for a built-in Keras layer whose own activation gives >= 0."""
    if not type(layer).__module__.startswith("keras.") or not hasattr(layer, "activation"):
        return False
    return registry.activation_rule(registry.activation_name(layer)).nonnegative_output


def _batchnorm_keeps_nonnegative(layer):
    scale, shift = registry.batchnorm_scale_shift(layer)
    return bool(scale.min() >= 0 and shift.min() >= 0)


def nonnegativity(graph, steps, flags, alias, removed, allowed, assume_inactive=frozenset(),
                  assume_active=frozenset()):
    """Prove which tensors are >= 0 and remove the activations this makes
    identities (and the identities at inference).

    `assume_inactive`: names of affine layers to treat as if their kernel
    and bias were >= 0 (to ask what folding would do once they are);
    `assume_active`: names to treat as if they had a negative entry.
    Returns `(nonnegative, alias, removed)` with the maps extended.
    """
    nonneg = {k: bool(flag) for k, flag in zip(graph.inputs, flags)}
    alias, removed = dict(alias), dict(removed)
    for step in steps:
        inputs_ok = [nonneg.get(k, False) for k in step.inputs]
        if id(step) in removed:  # folded BatchNormalization
            nonneg[step.outputs[0]] = inputs_ok[0]
            continue
        kind = step.kind
        if kind == registry.IDENTITY and allowed(("identity", step.name)):
            alias[step.outputs[0]] = step.inputs[0]
            nonneg[step.outputs[0]] = inputs_ok[0]
            removed[id(step)] = "identity at inference"
        elif kind == registry.ACTIVATION:
            rule = step.activation
            identity = rule.linear or (rule.identity_on_nonnegative and inputs_ok[0])
            if identity and allowed(("activation", step.name)):
                alias[step.outputs[0]] = step.inputs[0]
                nonneg[step.outputs[0]] = inputs_ok[0]
                removed[id(step)] = (f"'{rule.name}' is the identity on its input"
                                     + ("" if rule.linear else " (>= 0)"))
            else:
                nonneg[step.outputs[0]] = rule.nonnegative_output
        elif kind == registry.AFFINE:
            nonneg[step.outputs[0]] = bool(inputs_ok[0] and step.name not in assume_active and (
                step.name in assume_inactive or step.affine.nonnegative()))
        else:
            ok = bool(step.inputs) and all(inputs_ok) and (
                kind == registry.PASSTHROUGH
                or (kind == registry.BATCHNORM and _batchnorm_keeps_nonnegative(step.layer)))
            ok = ok or _nonnegative_activation_of(step.layer)
            for key in step.outputs:
                nonneg[key] = ok
    return nonneg, alias, removed


def nonnegative_flags(graph, nonnegative_inputs):
    """One bool per model input from `nonnegative_inputs` (bool or list)."""
    n = len(graph.inputs)
    if isinstance(nonnegative_inputs, (list, tuple)):
        if len(nonnegative_inputs) != n:
            raise ValueError(
                f"`nonnegative_inputs` has {len(nonnegative_inputs)} entries "
                f"but model '{graph.name}' has {n} inputs.")
        return [bool(f) for f in nonnegative_inputs]
    return [bool(nonnegative_inputs)] * n


def _all_finite(variable):
    if keras.backend.backend() == "tensorflow":
        # checked in the backend: copying every weight out costs seconds;
        # TensorFlow's own ops take half the time of keras.ops' wrappers
        import tensorflow as tf

        return bool(tf.reduce_all(tf.math.is_finite(variable.value)))
    # JAX and torch hand a CPU array to numpy without a copy, while running
    # the check as a backend op would compile it for every weight's shape
    # (JAX)
    return bool(np.isfinite(keras.ops.convert_to_numpy(variable)).all())


def check_finite(graph):
    """Raise ValueError if a layer holds NaN or inf weights."""
    seen = set()
    for node in graph.nodes:
        if id(node.layer) in seen:
            continue
        seen.add(id(node.layer))
        for variable in getattr(node.layer, "weights", []):
            if not keras.backend.is_float_dtype(variable.dtype):
                continue
            if not _all_finite(variable):
                raise ValueError(
                    f"Layer '{node.layer.name}' has non-finite values (NaN or inf) in "
                    f"weight '{variable.path}'; refusing to fold a model whose outputs "
                    "are undefined.")
