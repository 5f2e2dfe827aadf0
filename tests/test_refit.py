import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_layersparse as ls
from tf_layersparse.simulation import relu_mlp, simulate


@pytest.fixture(scope="module")
def trained():
    """One penalised MLP trained once for the tests below, which read it and
    never change it (`fold` and `refit` leave their model alone)."""
    keras.utils.set_random_seed(1234)  # module fixtures start before the per-test seed
    data = simulate(5, 0.1, seed=1)
    model = ls.apply_layer_sparsity(relu_mlp(2, 5, 5, seed=0), 0.5)
    model.compile(keras.optimizers.SGD(2e-2), "mse", metrics=["mae"])
    model.fit(data.x_train, data.y_train, batch_size=10, epochs=30, verbose=0)
    return model, data


def test_refit_trains_the_folded_architecture_with_original_settings(trained):
    model, data = trained
    folded = ls.fold(model)
    assert ls.model_cost(folded).depth < ls.model_cost(model).depth
    refitted, history = ls.refit(model, data.x_train, data.y_train, epochs=15,
                                 batch_size=10, verbose=0, seed=0)
    assert [l.name for l in refitted.layers] == [l.name for l in folded.layers]
    assert [w.shape for w in refitted.get_weights()] == [w.shape for w in folded.get_weights()]
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert "mae" in history.history
    assert isinstance(refitted.optimizer, keras.optimizers.SGD)
    assert float(refitted.optimizer.learning_rate) == pytest.approx(2e-2)
    assert refitted.optimizer is not model.optimizer
    assert not ls.regularized_layers(refitted)
    # fresh initialisation: not the folded weights
    fresh = ls.refit(model, data.x_train, data.y_train, epochs=0, verbose=0, seed=0)[0]
    assert not np.allclose(fresh.get_weights()[0], folded.get_weights()[0])


def test_warm_start_keeps_folded_weights(trained):
    model, data = trained
    folded = ls.fold(model)
    assert ls.model_cost(folded).depth < ls.model_cost(model).depth  # merged weights too
    warm, _ = ls.refit(model, data.x_train, data.y_train, warm_start=True, epochs=0,
                       verbose=0)
    for a, b in zip(warm.get_weights(), folded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_refit_accepts_a_dataset_and_overrides(trained):
    model, data = trained
    ds = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(10)
    refitted, history = ls.refit(model, ds, optimizer=keras.optimizers.Adam(1e-3),
                                 loss="mae", epochs=2, verbose=0)
    assert isinstance(refitted.optimizer, keras.optimizers.Adam)
    assert len(history.history["loss"]) == 2


def test_refit_of_uncompiled_model_needs_optimizer_and_loss():
    model = relu_mlp(2, 2, 3)
    with pytest.raises(ValueError, match="optimizer and loss"):
        ls.refit(model, np.ones((4, 2)), np.ones((4, 1)), epochs=1, verbose=0)
    refitted, _ = ls.refit(model, np.ones((4, 2)), np.ones((4, 1)), optimizer="sgd",
                           loss="mse", epochs=1, verbose=0)
    assert refitted is not model


def test_refit_keeps_batchnorm_of_the_blocks_that_stay():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 1))
    h = inputs
    for i in range(3):
        h = keras.layers.Conv2D(3, 3, use_bias=False, name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.get_layer("c1").set_weights([np.abs(model.get_layer("c1").get_weights()[0])])
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    x = np.random.default_rng(0).uniform(size=(16, 10, 10, 1)).astype("float32")
    y = np.zeros((16, 2), "float32")
    for keep, expected in ((True, ["bn0", "bn2"]), (False, [])):
        refitted, _ = ls.refit(model, x, y, nonnegative_inputs=True, policy="depth",
                               keep_batchnorm=keep, epochs=1, verbose=0, seed=0)
        bns = [l.name for l in refitted.layers
               if isinstance(l, keras.layers.BatchNormalization)]
        assert bns == expected
        convs = [l for l in refitted.layers if isinstance(l, keras.layers.Conv2D)]
        assert len(convs) == 2  # c1 merged into c2
