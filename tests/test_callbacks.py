"""Callbacks around fit: a fresh run starts clean; a resumed run keeps its best value and patience."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from kmel.training.callbacks import ResumableEarlyStopping, best_so_far
from kmel.training.train import _callbacks


def _model() -> keras.Model:
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def _find(callbacks, kind):
    return next(c for c in callbacks if isinstance(c, kind))


def test_best_so_far_by_mode_with_ties_to_the_earliest():
    assert best_so_far([0.6, 0.7, 0.7, 0.65], "max") == (0.7, 1)
    assert best_so_far([0.5, 0.3, 0.3, float("nan")], "min") == (0.3, 1)
    assert best_so_far([float("nan")], "min") is None and best_so_far([], "max") is None


def test_fresh_run_removes_a_previous_runs_history_and_best_weights(tmp_path):
    history, best = tmp_path / "classifier_history.csv", tmp_path / ".classifier.best.weights.h5"
    pd.DataFrame({"epoch": [0, 1], "val_auc": [0.9, 0.95]}).to_csv(history, index=False)
    best.write_bytes(b"old")
    callbacks, path = _callbacks("classifier", tmp_path, tmp_path / "runs", 3, [], monitor="val_auc", mode="max")
    assert path == best and not history.exists() and not best.exists()
    assert _find(callbacks, keras.callbacks.ModelCheckpoint).best is None or not np.isfinite(
        _find(callbacks, keras.callbacks.ModelCheckpoint).best)


def test_resumed_run_keeps_best_value_and_patience(tmp_path):
    (tmp_path / ".backup-classifier").mkdir()
    pd.DataFrame({"epoch": [0, 1, 2], "val_auc": [0.6, 0.7, 0.65]}).to_csv(
        tmp_path / "classifier_history.csv", index=False)
    (tmp_path / ".classifier.best.weights.h5").write_bytes(b"weights of epoch 1")
    callbacks, _ = _callbacks("classifier", tmp_path, tmp_path / "runs", 3, [], monitor="val_auc", mode="max")
    checkpoint = _find(callbacks, keras.callbacks.ModelCheckpoint)
    assert checkpoint.best == 0.7  # epoch 3 must beat epoch 1 to overwrite its weights
    stopping = _find(callbacks, ResumableEarlyStopping)
    model = _model()
    model.stop_training = False
    stopping.set_model(model)
    stopping.on_train_begin()
    assert (stopping.best, stopping.best_epoch, stopping.wait) == (0.7, 1, 1)
    stopping.on_epoch_end(3, {"val_auc": 0.69})
    assert not stopping.model.stop_training
    stopping.on_epoch_end(4, {"val_auc": 0.68})  # third epoch without improvement: patience 3 is used up
    assert stopping.model.stop_training and stopping.stopped_epoch == 4


def test_precise_batchnorm_averages_batch_statistics_and_skips_frozen_layers():
    from kmel.training.callbacks import apply_precise_batchnorm

    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn_train")(inputs)
    outputs = keras.layers.BatchNormalization(momentum=0.99, name="bn_frozen")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn_frozen").trainable = False
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=k, scale=1 + k, size=(64, 4)).astype("float32") for k in range(3)]
    assert apply_precise_batchnorm(model, batches) == 1
    bn = model.get_layer("bn_train")
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], axis=0), atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([b.var(0) for b in batches], axis=0), rtol=1e-3)
    assert bn.momentum == 0.99  # restored
    frozen = model.get_layer("bn_frozen")
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(frozen.moving_variance.numpy(), np.ones(4))
