import csv

import keras
import numpy as np
import pytest

import tf_layersparse as ls
from tf_layersparse.simulation import relu_mlp, simulate


def _fit(callbacks, epochs=3, strength=0.5, verbose=0):
    data = simulate(5, 0.1, seed=0)
    model = ls.apply_layer_sparsity(relu_mlp(2, 5, 5, seed=0), strength)
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    history = model.fit(data.x_train, data.y_train, batch_size=10, epochs=epochs,
                        callbacks=callbacks, verbose=verbose)
    return model, history


def test_active_layers_reaches_history_csv_and_progress_bar(tmp_path, capsys):
    tracker = ls.ActiveLayers(log_norms=True)
    log = tmp_path / "log.csv"
    model, history = _fit([tracker, keras.callbacks.CSVLogger(str(log))], verbose=2)
    counts = history.history["active_layers"]
    assert len(counts) == 3 and all(isinstance(c, int) for c in counts)
    assert counts[-1] == ls.active_layer_count(model)
    assert "negative_norm/hidden_2" in history.history
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["active_layers"]) for r in rows] == counts
    assert "active_layers:" in capsys.readouterr().out
    assert tracker.norms == ls.negative_part_norms(model)
    assert tracker.history["hidden_2"][-1] == tracker.norms["hidden_2"]


def test_active_layers_reaches_tensorboard(tmp_path):
    import tensorflow as tf

    _fit([ls.ActiveLayers(), keras.callbacks.TensorBoard(str(tmp_path))], epochs=1)
    tags = set()
    for path in (tmp_path / "train").glob("events*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    assert "epoch_active_layers" in tags


def test_count_falls_with_a_strong_penalty():
    tracker = ls.ActiveLayers()
    _fit([tracker], epochs=20, strength=2.0)
    counts = tracker.history["active_layers"]
    assert counts[-1] < counts[0]


def test_patience_stops_training():
    tracker = ls.ActiveLayers(patience=2)
    _, history = _fit([tracker], epochs=50, strength=0.0)  # count never changes
    assert len(history.history["loss"]) == 3
    assert tracker.stopped_epoch == 2


def test_model_without_penalty_is_a_clear_error():
    model = relu_mlp(2, 2, 3)
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no layer with a LayerSparsity"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), callbacks=[ls.ActiveLayers()],
                  verbose=0)


@pytest.mark.parametrize("kwargs", [{"tolerance": -1}, {"patience": 0}])
@pytest.mark.backend_independent
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ls.ActiveLayers(**kwargs)


@pytest.mark.backend_independent
def test_config_round_trip():
    cb = ls.ActiveLayers(tolerance=1e-3, patience=4, log_norms=True)
    assert ls.ActiveLayers(**cb.get_config()).get_config() == cb.get_config()
