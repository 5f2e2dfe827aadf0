"""A depth-target run interrupted and resumed from a checkpoint takes the
decisions the uninterrupted run takes, and ends with its weights.

The runs resumed after epochs 3, 6 and 9 start from copies of the
`BackupAndRestore` folder that the uninterrupted run left after those
epochs: what an interrupted run leaves there (the weights, the optimizer,
the epoch and the target's state, written at the end of the epoch) is
what the same run, not interrupted, wrote at that point.
`test_an_interrupted_fit_resumes_from_its_backup` stops a run by an
exception instead, as a crash does.
"""

import shutil

import keras
import numpy as np
import pytest

import tf_layersparse as ls

EPOCHS, STOPS = 12, (3, 6, 9)  # 8 steps an epoch
STOP = 3  # for the runs saved by ModelCheckpoint or model.save
BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch trains this module's small models on one thread: with its
    default two, on a busy 2-core machine, the file took 113 s instead of
    32 s (the convolutions)."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n=128, seed=0):
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
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP:
            raise RuntimeError("interrupted")


class _Stop(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP:
            self.model.stop_training = True


class _Copies(keras.callbacks.Callback):
    """Copies the `BackupAndRestore` folder after each epoch in `STOPS`
    (placed after `BackupAndRestore`, which writes it at the epoch's end)."""

    def __init__(self, backup, into):
        super().__init__()
        self.backup, self.into = backup, into

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 in STOPS:
            shutil.copytree(self.backup, self.into / f"after{epoch + 1}")


def _fit(model, callbacks, initial_epoch=0, data=_data, batch_size=BATCH):
    x, y = data()
    return model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, initial_epoch=initial_epoch,
                     shuffle=False, verbose=0, callbacks=callbacks)


def _target():
    return ls.ActiveLayers(target=ls.DepthTarget(3))


def _uninterrupted(tmp_path_factory, model, callback, **fit):
    """Trains `model` without interruption, keeping a copy of its backup
    after each epoch in `STOPS`."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    backup = str(folder / "backup")
    history = _fit(model, [callback, keras.callbacks.BackupAndRestore(backup),
                           _Copies(backup, folder)], **fit)
    return {"progress": callback.progress, "history": history.history,
            "weights": model.get_weights(), "folder": folder}


def _resumed_from_copy(run, stop, tmp_path, model, callback, **fit):
    """As a restarted script: a new model and callback, and the backup the
    run left after epoch `stop`."""
    backup = tmp_path / "backup"
    shutil.copytree(run["folder"] / f"after{stop}", backup)
    history = _fit(model, [callback, keras.callbacks.BackupAndRestore(str(backup))], **fit)
    assert len(history.history["loss"]) == EPOCHS - stop  # it did resume
    return history.history


def _same_weights(weights, expected):
    assert len(weights) == len(expected)
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _same_run(progress, history, weights, run, stop):
    expected = run["progress"]
    assert progress.reached and progress.holds == expected.holds
    assert progress.begin_step == expected.begin_step
    for key in ("held_layers", "active_layers"):
        assert history[key] == run["history"][key][stop:], key
    np.testing.assert_allclose(history["loss"], run["history"]["loss"][stop:], rtol=1e-5)
    _same_weights(weights, run["weights"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    callback = _target()
    run = _uninterrupted(tmp_path_factory, _model(), callback)
    held = run["history"]["held_layers"]
    assert callback.progress.reached
    # the first stop falls before the last hold, the last one after it
    assert held[STOPS[0] - 1] < 3 and held[STOPS[-1] - 1] == 3 and len(set(held)) > 2
    return run


@pytest.mark.parametrize("stop", STOPS)
def test_backup_and_restore_resumes_the_target(tmp_path, uninterrupted, stop):
    model, callback = _model(seed=2), _target()
    history = _resumed_from_copy(uninterrupted, stop, tmp_path, model, callback)
    _same_run(callback.progress, history, model.get_weights(), uninterrupted, stop)


def test_an_interrupted_fit_resumes_from_its_backup(tmp_path, uninterrupted):
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(_model(), [_target(), keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    model, callback = _model(seed=2), _target()
    history = _fit(model, [callback, keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == EPOCHS - STOP
    _same_run(callback.progress, history.history, model.get_weights(), uninterrupted, STOP)


def test_model_checkpoint_and_load_model_resume_the_target(tmp_path, uninterrupted):
    path = str(tmp_path / "last.keras")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(_model(), [_target(), keras.callbacks.ModelCheckpoint(path), _Interrupt()])
    model, callback = keras.models.load_model(path), _target()
    history = _fit(model, [callback], initial_epoch=STOP)
    _same_run(callback.progress, history.history, model.get_weights(), uninterrupted, STOP)


def test_model_save_between_two_fits_resumes_the_target(tmp_path, uninterrupted):
    model, path = _model(), str(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="not reached"):
        _fit(model, [_target(), _Stop()])
    model.save(path)
    model, callback = keras.models.load_model(path), _target()
    history = _fit(model, [callback], initial_epoch=STOP)
    _same_run(callback.progress, history.history, model.get_weights(), uninterrupted, STOP)


class _StopAtOnce(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def test_a_resume_without_the_saved_state_says_it_starts_anew(tmp_path):
    model = _model()
    with pytest.warns(UserWarning, match="starts anew"):
        _fit(model, [_target(), _StopAtOnce()], initial_epoch=STOP)


# ---------------------------------------------------------------- Conv-BN

CONV_BATCH, CONV_IMAGES = 32, 256  # 8 steps an epoch


def _images(n=CONV_IMAGES, seed=0):
    """3-channel 6x6 images in [0, 1]; the class is the brightest channel."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 6, 6, 3)).astype("float32")
    return x, np.argmax(x.mean((1, 2)), -1).astype("int32")


def _convnet(optimizer, strength=1e-3, seed=0):
    """A 3x3 Conv-BN-ReLU stem and four 1x1 Conv-BN-ReLU blocks, with the
    penalty on every block (`apply_layer_sparsity`)."""
    keras.utils.set_random_seed(seed)
    h = inputs = keras.Input((6, 6, 3))
    for i in range(5):
        h = keras.layers.Conv2D(12, 3 if i == 0 else 1, padding="same", use_bias=False,
                                name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    base = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))
    model = ls.apply_layer_sparsity(base, strength, nonnegative_inputs=True)
    model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _adam():
    return keras.optimizers.Adam(3e-3)


def _flops_target():
    # a tenth of the steps of warm-up: this 96-step toy's loss has not
    # taken off by the latest begin (step 24), and two blocks in the 24
    # steps left push its inference-mode loss past the target's hard limit
    return ls.ActiveLayers(target=ls.DepthTarget(flops=0.7, wait_for_takeoff=False),
                           nonnegative_inputs=True)


_CONV_FIT = {"data": _images, "batch_size": CONV_BATCH}


@pytest.fixture(scope="module")
def conv_uninterrupted(tmp_path_factory):
    callback = _flops_target()
    run = _uninterrupted(tmp_path_factory, _convnet(_adam), callback, **_CONV_FIT)
    held = run["history"]["held_layers"]
    assert callback.progress.reached
    assert held[STOPS[0] - 1] < held[STOPS[-1] - 1] and len(set(held)) > 2
    return run


@pytest.mark.parametrize("stop", STOPS)
def test_backup_and_restore_resumes_a_flops_target_on_a_batchnorm_convnet(
        tmp_path, conv_uninterrupted, stop):
    model, callback = _convnet(_adam, seed=2), _flops_target()
    history = _resumed_from_copy(conv_uninterrupted, stop, tmp_path, model, callback,
                                 **_CONV_FIT)
    _same_run(callback.progress, history, model.get_weights(), conv_uninterrupted, stop)
    # the same FLOPs after each epoch, and the guard's inference-mode probe saw the same losses
    for name in ("flops_fraction", "inference_loss"):
        np.testing.assert_allclose(history[name], conv_uninterrupted["history"][name][stop:],
                                   rtol=1e-5, err_msg=name)


def _decaying_sgd():
    steps = EPOCHS * CONV_IMAGES // CONV_BATCH
    return keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.05, steps), momentum=0.9)


def test_backup_and_restore_resumes_the_block_steps_of_a_batchnorm_convnet(tmp_path_factory):
    """Without a target: by epoch 9 the decayed learning rate makes the
    proximal threshold smaller than the moves of the moving statistics,
    and the inactive blocks stay inactive by the step's memory of their
    statistics and inactivity at the end of the previous step."""
    run = _uninterrupted(tmp_path_factory, _convnet(_decaying_sgd, strength=10.0),
                         ls.ActiveLayers(), **_CONV_FIT)
    stop = STOPS[-1]
    assert run["history"]["active_layers"][stop - 1:stop + 1] == [0, 0]
    model = _convnet(_decaying_sgd, strength=10.0, seed=2)
    history = _resumed_from_copy(run, stop, tmp_path_factory.mktemp("resumed"), model,
                                 ls.ActiveLayers(), **_CONV_FIT)
    assert history["active_layers"] == run["history"]["active_layers"][stop:]
    np.testing.assert_allclose(history["loss"], run["history"]["loss"][stop:], rtol=1e-5)
    _same_weights(model.get_weights(), run["weights"])
