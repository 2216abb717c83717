"""train joint (issue 30): the segmenter's soft mask gating the classifier's input, trained end to end; its data
(masked and unmasked images), losses, stages, export, and predict / evaluate with the crop stage skipped."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from tests.tiny import tiny_config

JOINT = {"classifier.backbone": "resnet18", "classifier.image_size": 32, "classifier.batch_size": 8,
         "classifier.steps_per_epoch": 2, "classifier.unfreeze": [[0, "head"], [1, "all"]], "classifier.bootstrap": 20}


def _tiny_parts(config):
    from kmel.models.classifier import build_classifier
    from kmel.models.segmenter import build_segmenter

    keras.utils.set_random_seed(0)
    return build_segmenter(config.segmenter), build_classifier(config.classifier, 1)


def test_mask_gate_and_joint_model_round_trip(tmp_path):
    """gate = image × (α + (1 − α)·mask); the joint model's probability is the classifier's on the gated image, its
    mask the segmenter's resized to the input; it survives a safe-mode .keras round trip."""
    from kmel.models.joint import MaskGate, build_joint, joint_parts, probability_model

    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((2, 32, 32, 1), np.float32)
    masks[:, 8:24, 8:24] = 1.0
    gated = np.asarray(MaskGate(0.25)(images, masks))
    assert np.allclose(gated[:, 12, 12], images[:, 12, 12]) and np.allclose(gated[:, 2, 2], 0.25 * images[:, 2, 2])
    with pytest.raises(ValueError):
        MaskGate(1.5)

    config = tiny_config(**JOINT)  # the segmenter (64 px) reads a resized copy of the 32 px input
    segmenter, classifier = _tiny_parts(config)
    model = build_joint(segmenter, classifier, 0.25)
    out = model.predict_on_batch(images)
    assert out[C.JOINT_PROBABILITY].shape == (2, 1) and out[C.JOINT_MASK].shape == (2, 32, 32, 1)
    seg, cls = joint_parts(model)
    mask = np.asarray(keras.layers.Resizing(32, 32)(seg(keras.layers.Resizing(64, 64)(images))))
    assert np.allclose(out[C.JOINT_MASK], mask, atol=1e-5)
    assert np.allclose(out[C.JOINT_PROBABILITY], cls(images * (0.25 + 0.75 * mask)), atol=1e-5)
    model.save(tmp_path / "joint.keras")
    loaded = keras.saving.load_model(tmp_path / "joint.keras", safe_mode=True, compile=False)
    again = loaded.predict_on_batch(images)
    assert np.allclose(again[C.JOINT_PROBABILITY], out[C.JOINT_PROBABILITY], atol=1e-6)
    assert np.allclose(probability_model(loaded).predict_on_batch(images), out[C.JOINT_PROBABILITY], atol=1e-6)


def test_joint_stages_freeze_the_segmenter_for_the_warm_up():
    from kmel.models.joint import build_joint, joint_parts
    from kmel.models.segmenter import set_trainable_stages
    from kmel.training.callbacks import all_layers, apply_precise_batchnorm
    from kmel.training.joint import joint_schedule, set_joint_stage

    schedule = joint_schedule(((0, "head"), (2, "all")), 1)
    assert schedule == ((0, "head/segmenter frozen"), (1, "head/segmenter trains"), (2, "all/segmenter trains"))
    segmenter, classifier = _tiny_parts(tiny_config(**JOINT))
    set_trainable_stages(segmenter, "4")  # a segmenter saved before its schedule reached "all": stages frozen
    n_weights = len(segmenter.weights) + len(classifier.weights)
    model = build_joint(segmenter, classifier, 0.25)
    # every weight trainable at the start, so the optimizer is built over all (the stages then freeze)
    assert len(model.trainable_weights) == len([w for w in model.weights if w.trainable]) and \
        all(layer.trainable for layer in all_layers(model))
    assert len(model.weights) == n_weights
    seg, cls = joint_parts(model)
    set_joint_stage(model, schedule[0][1], freeze_batchnorm=True)
    assert not seg.trainable_weights and cls.get_layer("head_dense").trainable
    assert not [w for w in cls.trainable_weights if not w.path.startswith("head_")]  # the head alone
    head_only = len(model.trainable_weights)
    set_joint_stage(model, schedule[1][1], freeze_batchnorm=True)
    assert seg.trainable_weights and len(model.trainable_weights) > head_only
    assert not any(la.trainable for la in seg.layers if isinstance(la, keras.layers.BatchNormalization))
    # from scratch (BatchNorm learning), Precise BN reaches the classifier's BatchNorm inside the nested model
    set_joint_stage(model, schedule[2][1], freeze_batchnorm=False)
    n_bn = sum(isinstance(la, keras.layers.BatchNormalization) for la in cls.layers)
    assert n_bn and apply_precise_batchnorm(model, [np.zeros((2, 32, 32, 3), np.float32)]) == n_bn


def test_masked_tversky_leaves_out_images_without_a_mask():
    from kmel.training.losses import MaskedTverskyLoss, TverskyLoss

    rng = np.random.default_rng(1)
    truth = (rng.uniform(size=(3, 8, 8, 1)) > 0.5).astype(np.float32)
    pred = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
    per_image = np.asarray(TverskyLoss(reduction=None)(truth, pred))
    truth[1] = -1.0
    masked = np.asarray(MaskedTverskyLoss(reduction=None)(truth, pred))
    assert masked[1] == 0.0 and np.allclose(masked[[0, 2]], per_image[[0, 2]])


@pytest.fixture(scope="module")
def joint_records(tmp_path_factory) -> Path:
    """40 synthetic images, a quarter without an expert mask (their masks deleted before build-records)."""
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("joint")
    make_synthetic_dataset(tmp / "data", n_images=40, seed=3, size=96)
    for mask in sorted((tmp / "data" / "masks").iterdir())[::4]:
        mask.unlink()
    build_records(tmp / "data", tmp / "rec", tiny_config(), progress=False)
    return tmp / "rec"


def test_joint_dataset_has_every_labelled_image_and_marks_missing_masks(joint_records):
    from kmel.data.datasets import (
        count_joint_records,
        make_joint_dataset,
        make_joint_records,
    )
    from kmel.evaluation.evaluate import read_record_table

    config = tiny_config(**JOINT)
    table = read_record_table(joint_records)
    for split in ("train", "val", "test"):
        part = table[(table[C.COL_SPLIT] == split) & (table[C.COL_TARGET] >= 0)]
        ids = [r[C.F_IMAGE_ID].decode() for r in make_joint_records(joint_records, split, config, False)
               .as_numpy_iterator()]
        assert sorted(ids) == sorted(part.index) and count_joint_records(joint_records, split, config) == len(part)
    part = table[(table[C.COL_SPLIT] == "train") & (table[C.COL_TARGET] >= 0)]
    assert 0 < (~part["has_mask"].astype(bool)).sum() < len(part)  # both kinds present
    n_unmasked = 0
    for images, targets in make_joint_dataset(joint_records, "val", False, config, batch_size=4).as_numpy_iterator():
        masks = targets[C.JOINT_MASK]
        assert images.shape[1:] == (32, 32, 3) and masks.shape[1:] == (32, 32, 1) and images.max() > 1
        flat = masks.reshape(len(masks), -1)
        unknown = (flat == -1).all(axis=1)
        assert (unknown | ((flat >= 0).all(axis=1) & (flat <= 1).all(axis=1))).all()
        n_unmasked += int(unknown.sum())
    val = table[(table[C.COL_SPLIT] == "val") & (table[C.COL_TARGET] >= 0)]
    assert n_unmasked == int((~val["has_mask"].astype(bool)).sum())
    # predict's input for a file is the training input of its record (masked: seg record; unmasked: img record),
    # up to the records' JPEG and resampling
    import cv2

    from kmel.data.datasets import parse_joint_record
    from kmel.serving.predictor import JointInputs

    inputs = JointInputs(32, config)
    kinds = set()
    for record in make_joint_records(joint_records, "val", config, False).as_numpy_iterator():
        image_id, masked = record[C.F_IMAGE_ID].decode(), len(record[C.F_MASK]) > 0
        if masked in kinds:
            continue
        kinds.add(masked)
        path = next((joint_records.parent / "data" / "images").rglob(image_id + ".jpg"))
        trained = np.asarray(parse_joint_record(record, 32)[0])
        served = inputs.pre(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)).image.astype(np.float32)
        assert np.abs(trained - served).mean() < 4.0, (image_id, masked, np.abs(trained - served).mean())
    assert kinds == {True, False}
    # training batches: augmented, balanced, the missing masks still marked after the augmentation
    images, targets = next(iter(make_joint_dataset(joint_records, "train", True, config, batch_size=16)))
    flat = np.asarray(targets[C.JOINT_MASK]).reshape(16, -1)
    assert ((flat == -1).all(axis=1) | (flat >= 0).all(axis=1)).all()


def test_joint_refuses_inputs_larger_than_the_seg_records(joint_records):
    from kmel.config import ConfigError
    from kmel.data.datasets import make_joint_records

    with pytest.raises(ConfigError, match="seg_size"):
        make_joint_records(joint_records, "train", tiny_config(**{**JOINT, "classifier.image_size": 96}), False)  # records: 64 px


@pytest.mark.slow
def test_train_joint_predict_and_evaluate_through_the_cli(joint_records, tmp_path):
    """kmel train joint from a segmenter .keras: the joint model replaces the classifier (kind joint, serve returns
    probability and mask); predict skips the crop stage (crop_mode joint_no_crop, the whole image as box) and its
    probability is the model's on the padded image, calibrated; evaluate scores the whole images; TFLite refused."""
    from click.testing import CliRunner

    from cli import cli
    from kmel.models.segmenter import build_segmenter
    from tests.handmade import write_untrained_segmenter
    from tests.tiny import write_tiny_profile

    models = tmp_path / "models"
    config = tiny_config(**JOINT)
    write_untrained_segmenter(models, config)
    keras.utils.set_random_seed(0)
    build_segmenter(config.segmenter).save(models / C.SEGMENTER_KERAS)
    # one epoch, the segmenter training from the start (the warm-up's switch: test_joint_stages_...)
    profile = write_tiny_profile(tmp_path, epochs=1, steps=2, **{**JOINT, "joint.segmenter_warmup_epochs": 0})
    runner = CliRunner()
    missing = runner.invoke(cli, ["train", "joint", "--records", str(joint_records), "--out", str(tmp_path / "none"),
                                  "--profile", str(profile), "--quiet"])
    assert missing.exit_code != 0 and "train seg" in missing.output
    result = runner.invoke(cli, ["train", "joint", "--records", str(joint_records), "--out", str(models),
                                 "--profile", str(profile), "--logdir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 0, result.output
    entry = json.loads((models / C.PIPELINE_JSON).read_text())["classifier"]
    assert entry["kind"] == "joint" and entry["crops_dir"] is None and entry["epochs_run"] == 1
    assert entry["mask_metrics"]["val"]["images"] > 0 and 0 <= entry["mask_metrics"]["val"]["dice"] <= 1
    assert (models / "report" / "report.json").is_file()
    history = pd.read_csv(models / "classifier_history.csv")
    assert "val_probability_auc" in history and "mask_loss" in history

    import tensorflow as tf
    serve = tf.saved_model.load(str(models / C.CLASSIFIER_DIR)).signatures["serve"]
    out = serve(tf.zeros([1, 32, 32, 3]))
    assert set(out) == {C.JOINT_PROBABILITY, C.JOINT_MASK} and out[C.JOINT_MASK].shape == (1, 32, 32, 1)

    images = sorted((joint_records.parent / "data" / "images").rglob("*.jpg"))[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).write_bytes(image.read_bytes())
    csv = tmp_path / "pred.csv"
    result = runner.invoke(cli, ["predict", str(inputs), "--models", str(models), "--out", str(csv)])
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(csv)
    assert len(pred) == 3 and (pred["crop_mode"] == C.JOINT_CROP_MODE).all()
    assert (pred["box_x0"] == 0).all() and (pred["box_x1"] == 96).all()
    # the probability is the model's on the padded image, calibrated with the stored temperature
    from kmel.models.pipeline import apply_temperature
    from kmel.serving.predictor import JointInputs
    from kmel.serving.runtime import config_from_pipeline

    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    prep = JointInputs(32, config_from_pipeline(pipeline, models))
    import cv2
    first = pred.iloc[0]
    image = cv2.cvtColor(cv2.imread(str(first["path"])), cv2.COLOR_BGR2RGB)
    raw = serve(tf.constant(prep.pre(image).image[None].astype(np.float32)))[C.JOINT_PROBABILITY].numpy()
    assert float(first["probability"]) == pytest.approx(
        float(apply_temperature(raw.reshape(-1), entry["temperature"])[0]), abs=2e-3)

    result = runner.invoke(cli, ["evaluate", "--records", str(joint_records), "--models", str(models),
                                 "--out", str(tmp_path / "eval"), "--split", "test"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert (table["crop_mode"] == C.JOINT_CROP_MODE).all() and len(table) == entry["metrics"]["n"]
    # serve: the same model behind the HTTP API, its card saying what it is
    from fastapi.testclient import TestClient

    from kmel.serving.app import make_app

    by_name = pred.set_index(pred["path"].map(lambda path: Path(path).name))
    with TestClient(make_app(models)) as client:
        card = client.get("/api/model").json()
        assert card["models"]["joint"]["settings"]["alpha"] == 0.25
        response = client.post("/api/predict", files=[("files", (name.name, name.read_bytes(), "image/jpeg"))
                                                      for name in images[:2]])
        assert response.status_code == 200, response.text
        rows = response.json()["results"]
        assert [r["crop_mode"] for r in rows] == [C.JOINT_CROP_MODE] * 2
        assert rows[0]["probability"] == pytest.approx(float(by_name.loc[images[0].name, "probability"]),
                                                       abs=1e-5)
    refused = runner.invoke(cli, ["export", "--format", "tflite", "--models", str(models),
                                  "--records", str(joint_records)])
    assert refused.exit_code != 0 and "joint" in refused.output


def test_flip_average_reuses_the_plain_output_a_joint_call_gave():
    """predict --tta on a joint model: the plain view's probability comes with the mask, so only the three flips are
    scored again; the average is the same as scoring all four."""
    from kmel.serving.predictor import flip_averaged

    calls = []

    def classify(batch):
        calls.append(1)
        return batch[:, :2, :3].reshape(len(batch), -1).mean(axis=1, keepdims=True) * np.arange(1, len(batch) + 1)[:, None]

    batch = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    averaged = flip_averaged(classify)
    full = averaged(batch)
    calls.clear()
    reused = averaged(batch, plain=classify(batch))
    assert len(calls) == 4 and np.allclose(reused, full)  # 1 plain call here + 3 flips
