import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.simulation import relu_mlp, simulate

from helpers import to_numpy, weights_of


def _mlp(hidden=4, width=5, **kw):
    return relu_mlp(2, hidden, width, **kw)


def test_eligible_layers_skip_first_and_output():
    report = ls.eligible_layers(_mlp(4))
    assert [e.eligible for e in report] == [False, True, True, True, False]
    assert "input may be negative" in report[0].reason
    assert "linear" in report[-1].reason
    assert ls.eligible_layers(_mlp(4), nonnegative_inputs=True)[0].eligible


def test_separate_activation_layers_and_dropout_count_as_relu_type():
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4), keras.layers.ReLU(),
        keras.layers.Dense(4), keras.layers.Dropout(0.5), keras.layers.ReLU(),
        keras.layers.Dense(4, activation="relu6"),
        keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    eligible = {e.name: e.eligible for e in ls.eligible_layers(model)}
    names = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [eligible[n] for n in names] == [False, True, False, False, False]


def test_apply_layer_sparsity_copies_and_leaves_original_alone():
    base = _mlp(4)
    config, weights = base.get_config(), weights_of(base)
    model = ls.apply_layer_sparsity(base, 0.1)
    assert isinstance(model, ls.LayerSparseModel)
    assert base.get_config() == config
    assert all(np.array_equal(a, b) for a, b in zip(weights, weights_of(base)))
    assert all(getattr(layer, "kernel_regularizer", None) is None for layer in base.layers)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    regs = [type(layer.kernel_regularizer).__name__ for layer in dense]
    assert regs == ["NoneType"] + ["LayerSparsity"] * 3 + ["NoneType"]
    assert all(isinstance(layer.bias_regularizer, ls.LayerSparsity)
               for layer in ls.regularized_layers(model))
    x = np.random.default_rng(0).normal(size=(16, 2)).astype("float32")
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(base(x)))
    assert not {id(l) for l in model.layers} & {id(l) for l in base.layers}


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_apply_layer_sparsity_rejects_bad_strength(bad):
    with pytest.raises(ValueError, match="strength"):
        ls.apply_layer_sparsity(_mlp(3), bad)


def test_subclassed_model_is_rejected_by_name():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="custom_net")
            self.d = keras.layers.Dense(1)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.ones((1, 2)))
    with pytest.raises(TypeError, match="custom_net.*subclassed"):
        ls.apply_layer_sparsity(net, 0.1)
    with pytest.raises(TypeError, match="subclassed"):
        ls.fold(net)


def test_unbuilt_sequential_is_a_clear_error():
    with pytest.raises(ValueError, match="no defined input"):
        ls.fold(keras.Sequential([keras.layers.Dense(1)]))


def test_proximal_sgd_gives_exact_nonnegative_layers():
    data = simulate(6, 0.1, seed=3)
    # strength 1: every backend's own initialisation reaches exact zeros in
    # 40 epochs (at 0.5, torch's reached none)
    model = ls.apply_layer_sparsity(_mlp(6, seed=0), 1.0)
    model.compile(keras.optimizers.SGD(1e-2), "mse",
                  steps_per_execution=1 if keras.backend.backend() == "torch" else 10)
    model.fit(data.x_train, data.y_train, batch_size=10, epochs=40, verbose=0)
    inactive = [layer for layer in ls.regularized_layers(model)
                if ls.negative_part_norms(model)[layer.name] == 0.0]
    assert inactive, "expected some layer to become exactly inactive"
    for layer in inactive:
        assert np.min(to_numpy(layer.kernel)) >= 0 and np.min(to_numpy(layer.bias)) >= 0


def test_layer_sparse_model_save_load_and_clone(tmp_path):
    model = ls.apply_layer_sparsity(_mlp(3), 0.2, snap_tolerance=1e-4)
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    x = np.random.default_rng(1).normal(size=(20, 2)).astype("float32")
    model.fit(x, x[:, :1], epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ls.LayerSparseModel)
    reg = loaded.layers[2].kernel_regularizer
    assert isinstance(reg, ls.LayerSparsity) and reg.strength == 0.2 and reg.proximal
    assert reg.snap_tolerance == 1e-4
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    loaded.fit(x, x[:, :1], epochs=1, verbose=0)  # trains after loading
    clone = keras.models.clone_model(model)
    assert isinstance(clone, ls.LayerSparseModel)
    assert isinstance(clone.layers[2].kernel_regularizer, ls.LayerSparsity)


def test_plain_model_with_regularizer_saves_and_clones(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        3, activation="relu", kernel_regularizer=ls.LayerSparsity(0.3),
        bias_regularizer=ls.LayerSparsity(0.3)), keras.layers.Dense(1)])
    model.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert loaded.layers[0].kernel_regularizer.strength == 0.3
    assert keras.models.clone_model(model).layers[0].bias_regularizer.strength == 0.3


def test_gradient_accumulation_is_refused():
    model = ls.apply_layer_sparsity(_mlp(3), 0.2)
    model.compile(keras.optimizers.SGD(1e-2, gradient_accumulation_steps=2), "mse")
    with pytest.raises(ValueError, match="gradient accumulation"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), epochs=1, verbose=0)
