"""Other ways to a shallower convnet, each to be trained with the study's budget.

Every peer is matched to a depth-target run of the study by what that run
removed (the same number of layers, or the same FLOPs), so that the study
compares methods at equal latency:

- `with_batchnorm`: the folded architecture itself, freshly initialised,
  with a BatchNormalization after each conv: the architecture a target
  found, as one would train it from scratch.
- `data_free_collapse`: as many blocks collapsed, but chosen without data
  (spread evenly, or the first ones): whether the target's choice of
  layers is worth anything.
- `shallower_net`: the family's own net with fewer blocks per stage, as
  close as possible in FLOPs once BatchNormalization is fused.
- `linearisable` / `linearise`: activation linearisation (Layer Folding,
  Dror et al. 2021): each removable ReLU becomes `relu(x) + a * min(x, 0)`
  with one trainable slope `a` in [0, 1] per layer, pulled towards 1 (the
  identity) by `strength * (1 - a)`; then the `k` units with the largest
  slopes become identities, the others ReLUs again, and `fold` merges the
  identities away.
"""

import keras
import numpy as np

import tf_layersparse as ls
from tf_layersparse.targets import removal_savings
from tf_layersparse.experiments import convnet

__all__ = [
    "with_batchnorm",
    "removable_layers",
    "spread_evenly",
    "make_inactive",
    "block_of",
    "collapsed_blocks",
    "data_free_collapse",
    "shallower_net",
    "LinearisableReLU",
    "linearisable",
    "linearise",
]

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def with_batchnorm(model, seed=0):
    """A freshly initialised copy of `model` with a BatchNormalization after every
    conv (before its activation): the folded architecture as one would train it.

    >>> folded = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
    ...     keras.layers.Dense(2)])
    >>> [type(l).__name__ for l in with_batchnorm(folded).layers[1:]]
    ['Conv2D', 'BatchNormalization', 'Activation', 'Flatten', 'Dense']
    """
    keras.utils.set_random_seed(seed)

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, _CONVS):
            config = dict(config, activation="linear", use_bias=False)
        return layer.__class__.from_config(config)

    def call_layer(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if not isinstance(layer, _CONVS):
            return out
        out = keras.layers.BatchNormalization(momentum=convnet.BN_MOMENTUM,
                                              name=f"{layer.name}_bn")(out)
        original = model.get_layer(layer.name).get_config().get("activation", "linear")
        return keras.layers.Activation(original, name=f"{layer.name}_act")(out)

    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return keras.models.clone_model(model, clone_function=clone_layer,
                                    call_function=call_layer)


def removable_layers(model, nonnegative_inputs=True):
    """Names of the layers a fold can remove once inactive, in graph order: the
    eligible layers whose removal saves FLOPs under the cost policy.

    >>> net = convnet.build("mobilenet", small=True)
    >>> removable_layers(net)[:2]
    ['s0b0_expand_conv', 's0b0_dw']
    """
    eligible = [e.name for e in ls.eligible_layers(model, nonnegative_inputs) if e.eligible]
    savings, _ = removal_savings(model, eligible, nonnegative_inputs=nonnegative_inputs)
    return [name for name in eligible if name in savings]


def spread_evenly(names, count):
    """`count` of `names`, spread evenly (first and last included when count > 1).

    >>> spread_evenly(list("abcdefg"), 3), spread_evenly(list("abc"), 0)
    (['a', 'd', 'g'], [])
    """
    if count <= 0:
        return []
    if count >= len(names):
        return list(names)
    picks = np.round(np.linspace(0, len(names) - 1, count)).astype(int)
    return [names[i] for i in picks]


def make_inactive(model, names):
    """Set the weights of each layer of `names` (and of the BatchNormalization
    that follows it) so that its block is inactive, in place: non-negative
    kernels, unit statistics, positive shift.
    """
    for name in names:
        layer = model.get_layer(name)
        layer.set_weights([np.abs(w) for w in layer.get_weights()])
        for node in layer._outbound_nodes:
            follower = node.operation
            if isinstance(follower, keras.layers.BatchNormalization):
                gamma, beta, mean, var = follower.get_weights()
                follower.set_weights([np.abs(gamma) + 0.1, np.abs(beta) + 0.5,
                                      np.zeros_like(mean), np.ones_like(var)])


def block_of(name):
    """The block a layer of the study's nets belongs to: its name's first part.

    >>> block_of("s1b2_expand_conv"), block_of("s1b2_dw")
    ('s1b2', 's1b2')
    """
    return name.split("_")[0]


def collapsed_blocks(removable, held):
    """Blocks all of whose removable layers are in `held`: those a fold collapses.

    >>> collapsed_blocks(["s0b0_expand_conv", "s0b0_dw", "s0b1_expand_conv", "s0b1_dw"],
    ...                  ["s0b0_expand_conv", "s0b0_dw", "s0b1_dw"])
    ['s0b0']
    """
    held = set(held)
    blocks = dict.fromkeys(block_of(name) for name in removable)
    return [b for b in blocks if all(n in held for n in removable if block_of(n) == b)]


def data_free_collapse(arch_model, blocks, how="even", seed=0):
    """The architecture `arch_model` folds to with every removable layer of
    `blocks` of its blocks inactive, the blocks chosen without data (`how`:
    "even", spread evenly, or "first"), freshly initialised with a
    BatchNormalization after every conv.

    Whole blocks, because a block's layers fold away together: an inverted
    residual block whose expand layer alone were inactive would merge into a
    full 3x3 convolution, which costs more than the block (the cost policy
    keeps it).

    >>> net = convnet.build("mobilenet", small=True)
    >>> peer = data_free_collapse(net, 1)
    >>> ls.model_cost(ls.fold(peer)).depth, ls.model_cost(ls.fold(net)).depth
    (7, 9)
    """
    names = removable_layers(arch_model)
    order = list(dict.fromkeys(block_of(n) for n in names))
    chosen = set(spread_evenly(order, blocks) if how == "even" else order[:blocks])
    probe = keras.models.clone_model(arch_model)
    probe.set_weights(arch_model.get_weights())
    make_inactive(probe, [n for n in names if block_of(n) in chosen])
    folded = ls.fold(probe, nonnegative_inputs=True)
    return with_batchnorm(folded, seed=seed)


def _fused_flops(model):
    return ls.model_cost(ls.fold(model, nonnegative_inputs=True)).flops


def shallower_net(flops, arch="mobilenet", small=False, seed=0,
                  input_shape=convnet.INPUT_SHAPE):
    """`(blocks per stage, model)`: the family's net with fewer blocks per stage
    whose BN-fused FLOPs are closest to `flops`.

    >>> blocks, net = shallower_net(0, small=True)
    >>> blocks
    (0, 0)
    """
    widths, most = ((8, 16), 1) if small else ((16, 32, 64), 3)
    build = {"mobilenet": lambda blocks: convnet.mobilenet_net(widths, blocks, 6, seed,
                                                               input_shape),
             "vgg": lambda blocks: convnet.vgg_net(widths, blocks, seed, input_shape)}[arch]
    # a stage's blocks each cost the same, so 1 + stages fused nets give every count's cost
    empty = (0,) * len(widths)
    floor = _fused_flops(build(empty))
    per_block = [_fused_flops(build(tuple(int(i == s) for i in range(len(widths))))) - floor
                 for s in range(len(widths))]
    options = np.stack(np.meshgrid(*[range(most + 1)] * len(widths), indexing="ij"),
                       -1).reshape(-1, len(widths))
    costs = floor + options @ np.asarray(per_block)
    # closest in FLOPs; ties: more blocks in the later stages, as MobileNets grow
    best = min(range(len(options)), key=lambda i: (abs(costs[i] - flops), -options[i][-1]))
    blocks = tuple(int(b) for b in options[best])
    return blocks, build(blocks)


@keras.saving.register_keras_serializable(package="tf_layersparse.experiments")
class LinearisableReLU(keras.layers.Layer):
    """`relu(x) + slope * min(x, 0)`: a ReLU at slope 0, the identity at slope 1.

    One trainable slope per layer, kept in [0, 1]; a regularizer
    `strength * (1 - slope)` pulls it towards the identity.

    >>> unit = LinearisableReLU(0.1)
    >>> x = np.array([[-2.0, 3.0]], "float32")
    >>> keras.ops.convert_to_numpy(unit(x)).tolist()
    [[0.0, 3.0]]
    >>> _ = unit.slope.assign([1.0])
    >>> keras.ops.convert_to_numpy(unit(x)).tolist()
    [[-2.0, 3.0]]
    """

    def __init__(self, strength=0.0, **kwargs):
        super().__init__(**kwargs)
        self.strength = float(strength)

    def build(self, input_shape):
        strength = self.strength
        self.slope = self.add_weight(
            name="slope", shape=(1,), initializer="zeros",
            constraint=lambda a: keras.ops.clip(a, 0.0, 1.0),
            regularizer=(lambda a: strength * keras.ops.sum(1.0 - a)) if strength else None)

    def call(self, inputs):
        slope = keras.ops.cast(self.slope, inputs.dtype)
        return keras.ops.relu(inputs) + slope * keras.ops.minimum(inputs, 0.0)

    def get_config(self):
        return dict(super().get_config(), strength=self.strength)


def _activation_after(model, name):
    """Name of the ReLU layer that reads `name`'s block (through its BN), or None."""
    layer = model.get_layer(name)
    for _ in range(2):
        followers = [node.operation for node in layer._outbound_nodes]
        if len(followers) != 1:
            return None
        layer = followers[0]
        if isinstance(layer, keras.layers.ReLU):
            return layer.name
    return None


def linearisable(model, strength):
    """`(copy, unit names)`: a fresh copy of `model` whose removable layers'
    ReLUs are `LinearisableReLU(strength)` units.

    >>> net = convnet.build("mobilenet", small=True)
    >>> copy, units = linearisable(net, 0.01)
    >>> len(units), type(copy.get_layer(units[0])).__name__
    (4, 'LinearisableReLU')
    """
    units = [u for u in (_activation_after(model, n) for n in removable_layers(model)) if u]

    def clone_layer(layer):
        if layer.name in units:
            return LinearisableReLU(strength, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone_layer), units


def linearise(model, units, count):
    """`(copy, linearised names)`: the `count` units of `units` with the largest
    slopes become identities, the others plain ReLUs; weights are kept.

    >>> net = convnet.build("mobilenet", small=True)
    >>> copy, units = linearisable(net, 0.01)
    >>> plain, chosen = linearise(copy, units, 1)
    >>> sorted({type(l).__name__ for l in plain.layers} & {"Identity", "LinearisableReLU"})
    ['Identity']
    """
    slopes = {u: float(keras.ops.convert_to_numpy(model.get_layer(u).slope)[0]) for u in units}
    chosen = sorted(units, key=lambda u: -slopes[u])[:count]

    def clone_layer(layer):
        if layer.name in chosen:
            return keras.layers.Identity(name=layer.name)
        if layer.name in units:
            return keras.layers.ReLU(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    plain = keras.models.clone_model(model, clone_function=clone_layer)
    for source, target in zip(model.layers, plain.layers):
        if source.name not in units:
            target.set_weights(source.get_weights())
    return plain, chosen
