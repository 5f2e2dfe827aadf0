"""Decide what folding does to every layer, without building anything.

After the passes of `passes.py` (BatchNormalization into blocks, proof of
non-negativity, removal of activations that are identities), affine steps
that read each other directly (or through a Flatten, Conv -> Flatten ->
Dense) form chains. Each chain is cut into segments, each merged into one
layer: the "depth" policy takes the fewest segments that merge exactly;
the "cost" policy (the default) only merges a segment whose merged layer
has no more parameters and FLOPs than the layers it replaces, judging the
segment as a whole (an inverted residual block pays only once its expand,
depthwise and project layers are all in). Finally an `Add` of a segment and
its own input becomes one layer with the identity in its kernel (RepVGG).

A chain also crosses a `ZeroPadding` layer after a 1x1 layer: the padding
moves to the segment's input (it commutes with the 1x1 map) and the merged
layer gets a bias map for the border (see `merge`). A padding left in front
of a merged convolution is absorbed when the two are Keras' 'same' padding,
and a `ZeroPadding -> k x k 'valid' -> Add` with the kernel centred on the
block input becomes one 'same' convolution with the identity in its centre
tap. Every merge has a route: "exact", "exact, bias map" or "approximate".
"""

import dataclasses
from typing import Optional

import keras
import numpy as np

from tf_layersparse import registry
from tf_layersparse.folding import merge as merge_lib
from tf_layersparse.folding import passes
from tf_layersparse.folding.report import statuses
from tf_layersparse.graph import model_graph

__all__ = ["FoldPlan", "POLICIES", "ROUTES", "Segment", "nonnegative_tensors", "plan_fold"]

POLICIES = ("cost", "depth")
ROUTES = ("exact", "exact, bias map", "approximate")
_PADDINGS = tuple(getattr(keras.layers, f"ZeroPadding{r}D") for r in (1, 2, 3)
                  if hasattr(keras.layers, f"ZeroPadding{r}D"))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Affine steps merged into one layer (one step when nothing merged)."""

    steps: tuple
    affine: merge_lib.Affine
    crossed: Optional[object] = None  # the Flatten or ZeroPadding step crossed, if any
    residual: Optional[object] = None  # the Add step fused (RepVGG), if any
    padding: Optional[object] = None  # ZeroPadding step absorbed into 'same', if any

    @property
    def last(self):
        return self.steps[-1]

    @property
    def flatten(self):
        crossed = self.crossed
        return crossed if crossed is not None and _is_flatten(crossed) else None

    @property
    def input(self):
        if self.padding is not None and self.padding is not self.crossed:
            return self.padding.inputs[0]  # the merged layer pads itself ('same')
        if self.padding is not None:
            return self.steps[0].inputs[0]
        if self.crossed is not None:  # the crossed layer now reads the segment's input
            return self.crossed.outputs[0]
        return self.steps[0].inputs[0]

    @property
    def route(self):
        if not self.affine.exact:
            return "approximate"
        return "exact" if self.affine.bias_map is None else "exact, bias map"

    @property
    def output(self):
        return self.last.outputs[0]


@dataclasses.dataclass
class FoldPlan:
    """Everything `rebuild` and the report need.

    `kept`: surviving steps in order (an affine step stands for its
    segment, see `segments`); `alias`: tensor key -> key that replaces it;
    `decisions`: keys of every change made, for the self-check to forbid.
    """

    graph: object
    kept: list
    segments: dict  # id(last step) -> Segment
    alias: dict
    merges: list  # (kept layer name, [names of the layers merged into it])
    skipped: list  # (first, second, reason)
    statuses: dict  # layer name -> LayerStatus
    nonnegative: dict
    decisions: list
    approximate: list  # names of merged layers that differ at 'same' borders
    routes: dict = dataclasses.field(default_factory=dict)  # merged layer -> route

    def resolve(self, key):
        while key in self.alias:
            key = self.alias[key]
        return key


def _boundary_reason(prev, key, readers, output_keys):
    if key in output_keys:
        return f"output of '{prev.name}' is a model output"
    if readers.get(key, 0) > 1:
        return f"output of '{prev.name}' feeds {readers[key]} layers"
    return None


def _is_flatten(step):
    return type(step.layer) is keras.layers.Flatten


def _pad_amounts(step):
    """`((before, after), ...)` of a channels-last ZeroPadding step."""
    padding = step.layer.padding
    if type(step.layer).__name__ == "ZeroPadding1D":
        return (tuple(int(p) for p in padding),)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _crossable(step, producers):
    """The Flatten (before a Dense) or ZeroPadding (before a convolution)
    step `step` reads, when a merge may cross it."""
    via = producers.get(step.inputs[0])
    if via is None or via.kind != registry.PASSTHROUGH or len(via.inputs) != 1:
        return None
    if step.affine.form == "dense":
        return via if _is_flatten(via) else None
    if (type(via.layer) in _PADDINGS and not step.affine.channels_first
            and getattr(via.layer, "data_format", "channels_last") == "channels_last"
            and len(via.node.shapes[0]) == step.affine.rank + 2):
        return via
    return None


def _edges(kept, readers, output_keys, allowed, skipped):
    """`{id(step): (next step, crossed Flatten/ZeroPadding step or None)}`
    of mergeable pairs."""
    affine_out = {s.outputs[0]: s for s in kept if s.kind == registry.AFFINE}
    producers = {k: s for s in kept for k in s.outputs}
    edges = {}
    for step in kept:
        if step.kind != registry.AFFINE:
            continue
        prev, via = affine_out.get(step.inputs[0]), None
        if prev is None:
            via = _crossable(step, producers)
            prev = affine_out.get(via.inputs[0]) if via is not None else None
            if prev is None or (_is_flatten(via) and prev.affine.form == "dense"):
                continue
            reason = (_boundary_reason(prev, via.inputs[0], readers, output_keys)
                      or _boundary_reason(via, step.inputs[0], readers, output_keys))
        else:
            reason = _boundary_reason(prev, step.inputs[0], readers, output_keys)
        if reason is None and not allowed(("merge", prev.name, step.name)):
            reason = "reverted: the self-check found this merge wrong"
        if reason is None:
            edges[id(prev)] = (step, via)
        else:
            skipped.append((prev.name, step.name, reason))
    return edges


def _chains(kept, edges):
    targets = {id(nxt) for nxt, _ in edges.values()}
    chains = []
    for step in kept:
        if step.kind != registry.AFFINE or id(step) in targets:
            continue
        chain, flattens = [step], []
        while id(chain[-1]) in edges:
            nxt, flatten = edges[id(chain[-1])]
            chain.append(nxt)
            flattens.append(flatten)
        chains.append((chain, flattens))
    return chains


def _has_bias(step):
    return bool(getattr(step.layer, "use_bias", False) or step.batchnorm is not None)


def _step_cost(step):
    return step.affine.cost(step.node.shapes[0], _has_bias(step))


def _flatten_channels_first(flatten):
    return flatten.layer.get_config().get("data_format") == "channels_first"


def _in_out(affine):
    if affine.form == "dense":
        return affine.kernel.shape[0], affine.kernel.shape[1]
    channels = affine.kernel.shape[-2] * (affine.groups if affine.form == "conv" else 1)
    units = affine.pointwise.shape[-1] if affine.form == "separable" else (
        affine.kernel.shape[-1] * (affine.kernel.shape[-2] if affine.form == "depthwise" else 1))
    return channels, units


def _hopeless(chain, flattens, i, j, budget):
    """True when no segment chain[i..j'] (j' >= j) can have at most
    `budget` parameters: a dense merged kernel has at least c_in(i) *
    extent * min c_out(j') of them, and the extent only grows. Saves
    composing big kernels (a ResNet bottleneck) the cost policy rejects."""
    first = chain[i].affine
    if any(f is not None and _is_flatten(f) for f in flattens[i:]):
        return False
    if first.form in ("depthwise", "separable") and all(
            _per_position(chain[k].affine, flattens[k - 1]) for k in range(i + 1, j + 1)):
        # still depthwise/separable, cheaper than this bound; a later kxk or
        # strided conv makes it one dense conv for good (NASNet's separable
        # pairs: composing their 9x9 kernels, all refused, took most of a fold)
        return False
    extent, stride = None, None
    for step in chain[i:j + 1]:
        affine = step.affine
        if affine.form == "dense":
            continue
        _, strides, dilation = affine.geometry
        if extent is None:
            extent, stride = [1] * affine.rank, [1] * affine.rank
        for a in range(affine.rank):
            extent[a] += (affine.kernel.shape[a] - 1) * dilation[a] * stride[a]
            stride[a] *= strides[a]
    size = 1 if extent is None else int(np.prod(extent))
    smallest_out = min(_in_out(s.affine)[1] for s in chain[j:])
    return _in_out(first)[0] * size * smallest_out > budget


def _per_position(affine, crossed):
    """True if `affine` after a depthwise/separable map keeps its form."""
    if affine.form == "dense":
        return True
    _, strides, _ = affine.geometry
    return crossed is None and all(n == 1 for n in affine.spatial) and all(
        st == 1 for st in strides)


def _merge_range(chain, flattens, i, approximate, budget=None):
    """Merged affine of chain[i..j] for each j, stopping at the first pair
    that cannot merge: `(list of (j, Affine, crossed step), reason or
    None)`; with a parameter `budget` (cost policy), also where `_hopeless`."""
    merged, out, crossed = chain[i].affine, [], None
    for j in range(i + 1, len(chain)):
        via = flattens[j - 1]
        if budget is not None and _hopeless(chain, flattens, i, j, budget):
            return out, None
        if via is not None and crossed is not None:
            # the merged layer can read one relocated layer, not a stack of them
            return out, f"a merge crosses one Flatten or ZeroPadding, not also '{via.name}'"
        in_shape = tuple(chain[j - 1].node.shapes[0][1:-1])
        try:
            if via is not None and _is_flatten(via):
                in_shape = _input_shape(chain[i])
                merged = merge_lib.compose_through_flatten(
                    merged, chain[j].affine, in_shape, chain[j - 1].node.shapes[0][1:],
                    _flatten_channels_first(via))
            else:
                pad = _pad_amounts(via) if via is not None else None
                merged = merge_lib.compose(merged, chain[j].affine, approximate,
                                           in_shape=in_shape, pad=pad)
        except merge_lib.CannotMerge as error:
            return out, str(error)
        crossed = via if via is not None else crossed
        out.append((j, merged, crossed))
    return out, None


def _input_shape(step):
    return tuple(step.node.input_shapes[0][1:])



def _segments(chain, flattens, policy, approximate, skipped):
    n = len(chain)
    costs = [_step_cost(s) for s in chain]
    options = {i: [(i, chain[i].affine, None)] for i in range(n)}
    failures = {}
    for i in range(n - 1):
        budget = sum(c[0] for c in costs[i:]) if policy == "cost" else None
        found, reason = _merge_range(chain, flattens, i, approximate, budget)
        options[i] += found
        if reason is not None:
            failures[(i, i + 1 + len(found))] = reason
    pair_reason = {}
    # best[j]: (segments, flops, list of Segment) covering chain[:j]
    best = [(0, 0, [])] + [None] * n
    for j in range(1, n + 1):
        for i in range(j):
            if best[i] is None:
                continue
            match = [o for o in options[i] if o[0] == j - 1]
            if not match:
                continue
            _, affine, crossed = match[0]
            with_bias = any(_has_bias(s) for s in chain[i:j])
            after = affine.cost(chain[j - 1].node.shapes[0], with_bias)
            before = [sum(c[k] for c in costs[i:j]) for k in (0, 1)]
            if policy == "cost" and j - i > 1 and (after[0] > before[0] or after[1] > before[1]):
                if j - i == 2:
                    pair_reason[i] = (
                        "cost policy: merging would grow parameters "
                        f"{before[0]} -> {after[0]}, FLOPs {before[1]} -> {after[1]}")
                continue
            flops = best[i][1] + (after[1] if j - i > 1 else costs[i][1])
            candidate = (best[i][0] + 1, flops,
                         best[i][2] + [Segment(tuple(chain[i:j]), affine, crossed)])
            if best[j] is None or candidate[:2] < best[j][:2]:
                best[j] = candidate
    segments = best[n][2]
    for seg in segments[:-1]:
        k = chain.index(seg.last)
        reason = pair_reason.get(k) or failures.get((k, k + 1)) or (
            "cost policy: merging grows the cost of the chain")
        skipped.append((seg.last.name, chain[k + 1].name, reason))
    return segments


def _padding_before(seg, producers, readers, output_keys):
    """The ZeroPadding step in front of `seg`'s merged layer (crossed, or
    read by its first step only), or None."""
    if seg.crossed is not None:
        return None if _is_flatten(seg.crossed) else seg.crossed
    first = seg.steps[0]
    pad = producers.get(first.inputs[0])
    if (pad is None or pad.kind != registry.PASSTHROUGH or type(pad.layer) not in _PADDINGS
            or len(pad.inputs) != 1 or first.affine.form == "dense"
            or _crossable(first, producers) is not pad
            or _boundary_reason(pad, first.inputs[0], readers, output_keys)):
        return None
    return pad


def _absorb_padding(seg, pad, allowed):
    """`seg` with `pad` absorbed into its merged layer as 'same' padding, or
    None when the two are not Keras' 'same' for this input size."""
    affine = seg.affine
    if pad is None or affine.form == "dense" or affine.channels_first or not allowed(
            ("padding", pad.name)):
        return None
    padding, strides, dilation = affine.geometry
    size = pad.node.input_shapes[0][1:-1]
    if padding != "valid" or any(n is None for n in size) or len(size) != affine.rank:
        return None
    same = tuple(merge_lib.same_pads(n, k, s, d)
                 for n, k, s, d in zip(size, affine.spatial, strides, dilation))
    if same != _pad_amounts(pad):
        return None
    return dataclasses.replace(
        seg, affine=dataclasses.replace(affine, geometry=("same", strides, dilation)),
        padding=pad)


def _absorb_paddings(plan_segments, kept, readers, output_keys, allowed):
    """A ZeroPadding before a merged convolution that amounts to Keras'
    'same' becomes that convolution's own padding (one layer less)."""
    producers = {k: s for s in kept for k in s.outputs}
    for key, seg in list(plan_segments.items()):
        if len(seg.steps) > 1:
            pad = _padding_before(seg, producers, readers, output_keys)
            plan_segments[key] = _absorb_padding(seg, pad, allowed) or seg


def _residuals(plan_segments, kept, readers, output_keys, allowed, policy):
    """Fuse `Add([segment(x), x])` into the segment (RepVGG), also through a
    ZeroPadding before it whose padding centres the kernel on `x`."""
    by_output = {seg.output: seg for seg in plan_segments.values()}
    producers = {k: s for s in kept for k in s.outputs}
    fused = {}
    for step in kept:
        if type(step.layer) is not keras.layers.Add or len(step.inputs) != 2:
            continue
        for k_out, k_in in (step.inputs, step.inputs[::-1]):
            seg = by_output.get(k_out)
            if seg is not None and seg.input != k_in and seg.padding is None:
                pad = _padding_before(seg, producers, readers, output_keys)
                source = None if pad is None else (
                    seg.steps[0].inputs[0] if pad is seg.crossed else pad.inputs[0])
                if source == k_in:
                    seg = _absorb_padding(seg, pad, allowed) or seg
            if (seg is None or seg.flatten is not None or seg.input != k_in
                    or readers.get(k_out) != 1 or readers.get(k_in) != 2
                    or k_out in output_keys or not allowed(("residual", step.name))
                    or step.node.shapes[0] != seg.last.node.shapes[0]):
                continue
            try:
                affine = merge_lib.add_identity(seg.affine)
            except merge_lib.CannotMerge:
                continue
            with_bias = any(_has_bias(s) for s in seg.steps)
            shape = seg.last.node.shapes[0]
            after, before = affine.cost(shape, with_bias), seg.affine.cost(shape, with_bias)
            if policy == "cost" and (after[0] > before[0] or after[1] > before[1]):
                continue
            new = dataclasses.replace(seg, affine=affine, residual=step)
            plan_segments[id(seg.last)] = new
            fused[id(step)] = new
            break
    return fused


def plan_fold(model, nonnegative_inputs=False, policy="cost", approximate=False,
              allowed=None, forbidden=frozenset(), assume_inactive=frozenset(),
              assume_active=frozenset()):
    """Work out what `fold` would do to `model`; see `FoldPlan`.

    `allowed(decision)` (all by default) lets the self-check forbid
    decisions: ("activation", name), ("identity", name), ("batchnorm",
    name), ("merge", first, second), ("residual", add name), ("padding",
    ZeroPadding name); decisions in `forbidden` are never taken.
    `assume_inactive` names affine layers to plan for as if their
    (effective) kernel and bias were >= 0: what fold would do once they
    are inactive, and `assume_active` names layers to plan for as if they
    had a negative entry. Such a plan is for counting only.
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
    given = allowed or (lambda decision: True)

    def allowed(decision):
        return decision not in forbidden and given(decision)

    graph = model_graph(model)
    passes.check_finite(graph)
    flags = passes.nonnegative_flags(graph, nonnegative_inputs)
    steps = passes.normalise(graph)
    bn_alias, bn_removed = passes.block_batchnorm(graph, steps, allowed)
    nonneg, alias, removed = passes.nonnegativity(graph, steps, flags, bn_alias, bn_removed,
                                                  allowed, frozenset(assume_inactive),
                                                  frozenset(assume_active))

    def resolve(key):
        while key in alias:
            key = alias[key]
        return key

    kept = [s for s in steps if id(s) not in removed]
    for step in kept:
        step.inputs = [resolve(k) for k in step.inputs]
    output_keys = {resolve(k) for k in graph.outputs}
    readers = {}
    for step in kept:
        for key in step.inputs:
            readers[key] = readers.get(key, 0) + 1
    skipped = []
    edges = _edges(kept, readers, output_keys, allowed, skipped)
    segments = {}
    for chain, flattens in _chains(kept, edges):
        for seg in _segments(chain, flattens, policy, approximate, skipped):
            segments[id(seg.last)] = seg
            if seg.crossed is not None:
                alias[seg.crossed.inputs[0]] = seg.steps[0].inputs[0]
    _absorb_paddings(segments, kept, readers, output_keys, allowed)
    fused = _residuals(segments, kept, readers, output_keys, allowed, policy)
    for add_id, seg in fused.items():
        alias[seg.residual.outputs[0]] = seg.output
        removed[id(seg.residual)] = f"residual Add fused into '{seg.last.name}' (RepVGG)"
    for seg in segments.values():
        if seg.padding is not None:
            removed[id(seg.padding)] = (
                f"zero padding absorbed into '{seg.last.name}' as its 'same' padding")
    members = {id(s) for seg in segments.values() for s in seg.steps[:-1]}
    kept = [s for s in kept if id(s) not in members and id(s) not in fused
            and id(s) not in removed]
    decisions = _decisions(steps, removed, segments)
    plan = FoldPlan(graph, kept, segments, alias, [], skipped, {}, nonneg, decisions, [])
    plan.merges = [(seg.last.name, [s.name for s in seg.steps]
                    + ([seg.residual.name] if seg.residual is not None else []))
                   for seg in segments.values() if len(seg.steps) > 1 or seg.residual]
    plan.approximate = [seg.last.name for seg in segments.values() if not seg.affine.exact]
    plan.routes = {seg.last.name: seg.route for seg in segments.values()
                   if len(seg.steps) > 1 or seg.residual}
    plan.statuses = statuses(graph, steps, removed, plan, readers, output_keys)
    return plan


def _decisions(steps, removed, segments):
    found = []
    for step in steps:
        if id(step) not in removed:
            continue
        kind = {registry.IDENTITY: "identity", registry.ACTIVATION: "activation",
                registry.BATCHNORM: "batchnorm"}.get(step.kind)
        if kind is not None:
            found.append((kind, step.name))
    for seg in segments.values():
        found += [("merge", a.name, b.name) for a, b in zip(seg.steps, seg.steps[1:])]
        if seg.residual is not None:
            found.append(("residual", seg.residual.name))
        if seg.padding is not None:
            found.append(("padding", seg.padding.name))
    return found


def nonnegative_tensors(model, nonnegative_inputs=False, graph=None):
    """`{tensor key of model_graph(model): provably >= 0}`, with the
    model's BatchNormalization blocks folded in and every activation that
    is an identity on its input removed.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, activation="relu"),
    ...     keras.layers.Dense(1, kernel_initializer="ones"),
    ...     keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(-1.0))])
    >>> flags = nonnegative_tensors(model)  # keys: input 0, then layer outputs
    >>> [flags[key] for key in (0, 1, 2, 3)]
    [False, True, True, False]
    """
    graph = graph or model_graph(model)
    steps = passes.normalise(graph)
    flags = passes.nonnegative_flags(graph, nonnegative_inputs)
    everything = lambda decision: True  # noqa: E731
    alias, removed = passes.block_batchnorm(graph, steps, everything)
    return passes.nonnegativity(graph, steps, flags, alias, removed, everything)[0]


def unmerged_batchnorm(model, **plan_kwargs):
    """Decisions that would fold a BatchNormalization into a layer that is
    not merged into a later one (its block stays; only inference fusion)."""
    plan = plan_fold(model, **plan_kwargs)
    merged = {step.batchnorm.name for seg in plan.segments.values()
              for step in seg.steps[:-1] if step.batchnorm is not None}
    return frozenset(d for d in plan.decisions
                     if d[0] == "batchnorm" and d[1] not in merged)
