"""A depth-target run interrupted and resumed from a checkpoint takes the
decisions the uninterrupted run takes, and ends with its weights."""

import keras
import numpy as np
import pytest

import tf_layersparse as ls

EPOCHS, STOP = 8, 3  # 16 steps an epoch; interrupted after epoch 3


def _data(n=256, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")
    return x, np.maximum(x[:, :1], 0) + 0.5 * x[:, 1:2]


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="first")(inputs)
    for i in range(5):
        reg = ls.LayerSparsity(1e-3, group="layer")
        h = keras.layers.Dense(8, activation="relu", kernel_regularizer=reg,
                               bias_regularizer=reg, name=f"hidden{i}")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    return model


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP:
            raise RuntimeError("interrupted")


class _Stop(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP:
            self.model.stop_training = True


def _fit(model, callbacks, initial_epoch=0):
    x, y = _data()
    return model.fit(x, y, batch_size=16, epochs=EPOCHS, initial_epoch=initial_epoch,
                     shuffle=False, verbose=0, callbacks=callbacks)


def _target():
    return ls.ActiveLayers(target=ls.DepthTarget(3))


@pytest.fixture(scope="module")
def uninterrupted():
    model = _model()
    callback = _target()
    history = _fit(model, [callback])
    assert callback.progress.reached
    return callback.progress, history.history["held_layers"], model.get_weights()


def _same_run(progress, held, weights, uninterrupted):
    expected, expected_held, expected_weights = uninterrupted
    assert progress.reached and progress.holds == expected.holds
    assert progress.begin_step == expected.begin_step
    assert held == expected_held[STOP:]
    for got, want in zip(weights, expected_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_backup_and_restore_resumes_the_target(tmp_path, uninterrupted):
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(_model(), [_target(), keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    # as a restarted script: a new model, a new callback, the same folder
    model, callback = _model(seed=2), _target()
    history = _fit(model, [callback, keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == EPOCHS - STOP
    _same_run(callback.progress, history.history["held_layers"], model.get_weights(),
              uninterrupted)


@pytest.mark.skipif(keras.backend.backend() == "jax", reason=(
    "on JAX the steered strengths are model variables while fit runs, so a model saved "
    "during fit does not load into a new one (tf_layersparse.proximal)"))
def test_model_checkpoint_and_load_model_resume_the_target(tmp_path, uninterrupted):
    path = str(tmp_path / "last.keras")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(_model(), [_target(), keras.callbacks.ModelCheckpoint(path), _Interrupt()])
    model, callback = keras.models.load_model(path), _target()
    history = _fit(model, [callback], initial_epoch=STOP)
    _same_run(callback.progress, history.history["held_layers"], model.get_weights(),
              uninterrupted)


def test_model_save_between_two_fits_resumes_the_target(tmp_path, uninterrupted):
    model, path = _model(), str(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="not reached"):
        _fit(model, [_target(), _Stop()])
    model.save(path)
    model, callback = keras.models.load_model(path), _target()
    history = _fit(model, [callback], initial_epoch=STOP)
    _same_run(callback.progress, history.history["held_layers"], model.get_weights(),
              uninterrupted)


def test_a_resume_without_the_saved_state_says_it_starts_anew(tmp_path):
    model = _model()
    with pytest.warns(UserWarning, match="starts anew"):
        _fit(model, [_target()], initial_epoch=STOP)
