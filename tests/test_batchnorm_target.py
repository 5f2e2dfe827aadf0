"""A depth target on a BatchNormalization convnet: what inference sees is
what training steered (held blocks normalise with their moving statistics
in training too), and the guard's inference-mode probe."""

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.inference_mode import HeldStatistics, InferenceProbe
from tf_layersparse.steering import Plan, Seen, Steering, steer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BLOCKS = 4


def _data(n=512, seed=0):
    """3-channel 6x6 images in [0, 1]; the class is the brightest channel."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 6, 6, 3)).astype("float32")
    y = np.argmax(x.mean((1, 2)), -1).astype("int32")
    return x, y


def _net(seed=0):
    """A 3x3 Conv-BN-ReLU stem, then 1x1 Conv-BN-ReLU blocks (removable)."""
    keras.utils.set_random_seed(seed)
    h = inputs = keras.Input((6, 6, 3))
    for i in range(BLOCKS + 1):
        h = keras.layers.Conv2D(12, 3 if i == 0 else 1, padding="same", use_bias=False,
                                name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


class _Statistics(keras.callbacks.Callback):
    """Each BatchNormalization layer's moving statistics after every epoch."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({
            layer.name: np.concatenate([keras.ops.convert_to_numpy(layer.moving_mean),
                                        keras.ops.convert_to_numpy(layer.moving_variance)])
            for layer in self.model.layers
            if isinstance(layer, keras.layers.BatchNormalization)})


def _training_mode(model, x, y, batch_size=64):
    """(accuracy, loss) with batch statistics, the moving ones left alone."""
    saved = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    logits = np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + batch_size],
                                                              training=True))
                             for i in range(0, len(x), batch_size)])
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)
    return float(np.mean(np.argmax(logits, -1) == y)), float(LOSS(y, logits))


def _input_statistics(model, x):
    """`{bn: (mean, variance)}` of each BatchNormalization layer's input in
    inference mode."""
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.inputs, [bn.input for bn in bns])
    found = {}
    for bn, h in zip(bns, probe.predict(x, verbose=0)):
        h = h.reshape(-1, h.shape[-1]).astype(np.float64)
        found[bn.name] = (h.mean(0), h.var(0))
    return found


EPOCHS, STEPS = 12, 16  # 512 images, batches of 32


def _numpy(tensor):
    return keras.ops.convert_to_numpy(keras.ops.stop_gradient(tensor))


def _optimizer(name):
    if name == "adam":
        return keras.optimizers.Adam(1e-3)
    return keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.05, EPOCHS * STEPS),
                                momentum=0.9)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_inference_sees_the_network_the_target_steered(optimizer):
    x, y = _data()
    # the 1x1 blocks only: the stem reads the images, and pulling it on
    # torch with SGD raised the inference-mode loss past the target's hard
    # limit, so that the target ended unmet (docs/RESULTS.md)
    model = ls.apply_layer_sparsity(_net(), 1e-3)
    model.compile(_optimizer(optimizer), LOSS, metrics=["accuracy"])
    steering = ls.ActiveLayers(target=ls.DepthTarget(inactive=2))
    statistics = _Statistics()
    keras.utils.set_random_seed(0)
    history = model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0,
                        callbacks=[steering, statistics])
    progress = steering.progress
    assert progress.reached and len(progress.held) == 2
    # every held block's statistics stayed as they were when it was held
    last_hold = max(progress.holds.values()) // STEPS
    held_bns = {f"bn{name[len('conv'):]}" for name in progress.held}
    for name in held_bns:
        for later in statistics.epochs[last_hold + 1:]:
            np.testing.assert_array_equal(later[name], statistics.epochs[-1][name])
    # the layers that still normalise have moving statistics that match
    # what their input is in inference mode (held-out images)
    x_test, y_test = _data(512, seed=1)
    found = _input_statistics(model, x_test)
    for bn in (layer for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)):
        if bn.name in held_bns:
            continue
        mean, variance = found[bn.name]
        moving_mean = keras.ops.convert_to_numpy(bn.moving_mean)
        moving_variance = keras.ops.convert_to_numpy(bn.moving_variance)
        offsets = np.abs(moving_mean - mean) / np.sqrt(variance + 1e-3)
        ratios = np.abs(np.log((moving_variance + 1e-3) / (variance + 1e-3)))
        assert np.median(offsets) < 0.2 and np.max(offsets) < 0.5, (bn.name, offsets)
        assert np.median(ratios) < 0.2 and np.max(ratios) < 0.5, (bn.name, ratios)
    # inference (moving statistics) scores as training mode (batch statistics) does
    inference_loss, inference_accuracy = model.evaluate(x_test, y_test, verbose=0)
    training_accuracy, training_loss = _training_mode(model, x_test, y_test)
    assert inference_accuracy > 0.7
    assert abs(inference_accuracy - training_accuracy) < 0.05
    assert inference_loss < 1.1 * training_loss + 0.02
    # the guard saw the inference-mode loss, and it is logged
    assert np.all(np.isfinite(history.history["inference_loss"]))
    # and the fold of the penalised net is exact
    folded = ls.fold(model)
    assert ls.model_cost(folded).depth == ls.model_cost(model).depth - 2
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)
    # nothing of the training machinery stays on the layers
    assert not any("call" in vars(layer) for layer in model.layers)
    assert "train_step" not in vars(model)
    config = model.get_layer("bn1").get_config()
    assert keras.layers.BatchNormalization.from_config(config).get_config() == config


def test_a_held_batchnorm_normalises_with_its_moving_statistics_in_training():
    bn = keras.layers.BatchNormalization(momentum=0.5)
    model = keras.Sequential([keras.Input((2,)), bn])
    hold = HeldStatistics(model, [bn])
    hold.install()
    x = np.array([[1.0, 2.0], [3.0, 6.0]], "float32")
    before = keras.ops.convert_to_numpy(bn.moving_mean)
    model(x, training=True)  # not held: batch statistics, which the moving ones follow
    moved = keras.ops.convert_to_numpy(bn.moving_mean)
    assert not np.allclose(moved, before)
    hold.set(bn, True)
    np.testing.assert_allclose(_numpy(model(x, training=True)),
                               _numpy(model(x, training=False)), atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), moved)
    hold.remove()
    assert "call" not in vars(bn)
    assert not np.allclose(_numpy(model(x, training=True)), _numpy(model(x, training=False)),
                           atol=1e-3)


def test_while_steering_the_statistics_follow_the_batches_faster():
    bn, other = (keras.layers.BatchNormalization(momentum=0.99) for _ in range(2))
    model = keras.Sequential([keras.Input((2,)), bn, other])
    hold = HeldStatistics(model, [bn], others=[bn, other], momentum=0.5)
    hold.install()
    x = np.array([[1.0, 2.0], [3.0, 6.0]], "float32")
    model(x, training=True)
    # moving = 0.5 * moving + 0.5 * batch, for block and other layers alike
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), [1.0, 2.0],
                               rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), [1.0, 2.5],
                               rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(other.moving_mean), [0.0, 0.0],
                               atol=1e-3)
    hold.remove()
    assert not any("call" in vars(layer) for layer in (bn, other))
    model(x, training=True)  # the layer's own momentum again
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), [1.01, 2.02],
                               rtol=1e-5)


def test_the_probe_measures_the_loss_of_its_batch_in_inference_mode():
    x, y = _data(64)
    model = _net()
    model.compile(keras.optimizers.SGD(0.0), LOSS)  # weights stay; statistics move
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # built as `fit` builds it
    probe = InferenceProbe(model)
    probe.install()
    model.make_train_function(force=True)
    try:
        assert probe.value() is None
        probe.request(True)
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        measured = probe.value()
        # after the step, with the statistics it left: what evaluate sees now
        np.testing.assert_allclose(measured, model.evaluate(x, y, verbose=0), rtol=1e-4)
        probe.request(False)
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        assert probe.value() == measured  # switched off: not measured again
    finally:
        probe.remove()
    assert "train_step" not in vars(model)


def test_the_inference_mode_loss_raises_the_guard():
    plan = Plan(begin=10, end=1010, savings={"a": 100, "b": 100}, weights={"a": 1, "b": 1},
                inactive=2)
    norms = {"a": 0.3, "b": 0.2}
    state = steer(Steering(), Seen(10, norms, loss=1.0, inference_loss=1.0), plan)
    assert state.reference == (1.0, None, 1.0)
    steady = steer(state, Seen(20, norms, loss=1.0, inference_loss=1.05), plan)
    assert steady.guard == "open" and not steady.paused
    # the training loss stays where it was; inference collapses
    state = steer(state, Seen(20, norms, loss=1.0, inference_loss=4.0), plan)
    assert state.guard == "paused" and state.paused
