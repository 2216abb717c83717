"""Nothing trusted blindly, nothing mixed: the checks before exported models run (fingerprints, SHA-256s,
one training, format version, the graph allow-list), NaN scores as error rows, and predict outputs that
record which models and options wrote them (refused when they differ, error rows retried, non-UTF-8
names kept). Issue 24's failures, each reproduced with tiny hand-made models (tests/handmade.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from tests.handmade import write_handmade_models, write_image


def _invoke(*args: str):
    from kmel.cli import cli

    return CliRunner().invoke(cli, [*args, "--quiet"], catch_exceptions=False)


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: "), result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("handmade")
    images = root / "images"
    for i in range(3):
        write_image(images / f"ISIC_{i}.jpg", i)
    return {"models": write_handmade_models(root / "models"), "other": write_handmade_models(root / "other", 0.5),
            "images": images}


def _copy_models(made: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["models"], tmp_path / "models"))


def _predict(models: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()):
    return _invoke("predict", *map(str, inputs), str(out), "--models", str(models), *extra)


def test_a_classifier_from_another_training_is_refused(made, tmp_path):
    models = _copy_models(made, tmp_path)
    shutil.rmtree(models / "classifier")
    shutil.copytree(made["other"] / "classifier", models / "classifier")
    result = _predict(models, tmp_path / "p.csv", made["images"])
    _one_line_error(result, str(models / "classifier"), "fingerprint", "--no-verify")
    assert not (tmp_path / "p.csv").exists()
    # The user who knows: --no-verify runs it.
    assert _predict(models, tmp_path / "p.csv", made["images"], extra=("--no-verify",)).exit_code == 0


def test_a_classifier_trained_on_another_segmenters_crops_is_refused(made, tmp_path):
    models = _copy_models(made, tmp_path)
    pipeline = json.loads((models / "pipeline.json").read_text())
    pipeline["classifier"]["segmenter_fingerprint"] = "0123456789abcdef"
    (models / "pipeline.json").write_text(json.dumps(pipeline))
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"]), "learned from crops of segmenter",
                    "kmel train cls")


def test_damaged_savedmodel_variables_are_refused_with_one_line(made, tmp_path):
    models = _copy_models(made, tmp_path)
    data = next((models / "classifier" / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[: max(1, data.stat().st_size // 2)])  # truncated
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"]), "fingerprint")
    _one_line_error(_predict(models, tmp_path / "q.csv", made["images"], extra=("--no-verify",)),
                    "cannot be loaded", "damaged")


def test_damaged_or_future_pipeline_json_is_one_line(made, tmp_path):
    models = _copy_models(made, tmp_path)
    text = (models / "pipeline.json").read_text()
    (models / "pipeline.json").write_text(text[: len(text) // 2])
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"]), "pipeline.json is damaged")
    pipeline = json.loads(text)
    pipeline["format_version"] = 99
    (models / "pipeline.json").write_text(json.dumps(pipeline))
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"]), "format_version 99", "upgrade kmel")


def test_a_model_that_writes_files_is_refused_unless_trusted(tmp_path):
    models = write_handmade_models(tmp_path / "models", extra="write_file")
    write_image(tmp_path / "in" / "x.jpg", 0)
    result = _predict(models, tmp_path / "p.csv", tmp_path / "in")
    _one_line_error(result, "WriteFile", "--trust-model")
    assert not (models / "written.txt").exists()
    result = _predict(models, tmp_path / "p.csv", tmp_path / "in", extra=("--trust-model",))
    assert result.exit_code == 0, result.output
    assert (models / "written.txt").exists()  # what the allow-list kept from running by default


def test_a_serving_function_cannot_borrow_the_savers_file_writes(tmp_path):
    """SaveV2 is allowed in the checkpoint saver's own functions only, not in anything ``serve`` calls."""
    import tensorflow as tf

    from kmel.models.integrity import ModelIntegrityError, check_graph

    class Sneaky(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable(1.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def serve(self, images):
            tf.raw_ops.SaveV2(prefix=str(tmp_path / "ckpt"), tensor_names=["v"], shape_and_slices=[""],
                              tensors=[self.v.read_value()])
            return {"probability": tf.reduce_mean(images, axis=[1, 2, 3]) * self.v}

    module = Sneaky()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serve": module.serve})
    with pytest.raises(ModelIntegrityError, match="SaveV2"):
        check_graph(tmp_path / "m")


def test_kmels_own_exports_pass_the_allow_list(tmp_path):
    """A new operation in kmel's exports (a Keras or TensorFlow upgrade, a new layer) fails here, before
    users' models are refused. The EfficientNet-B0 classifier and ResNet18 U-Net in float32 are exported
    and predicted through the checks by the end-to-end tests; here the Lite classifier with its Grad-CAM
    endpoint (float32) and a U-Net in mixed_float16 (its casts)."""
    import dataclasses

    import keras

    from kmel.models.classifier import build_classifier, classifier_last_conv
    from kmel.models.integrity import ALLOWED_OPS, check_graph, graph_ops
    from kmel.models.segmenter import build_segmenter
    from kmel.serving.export import export_serving
    from tests.tiny import tiny_config

    config = tiny_config()
    cc = dataclasses.replace(config.classifier, backbone="efficientnet_lite0", weights="none")
    exported = [export_serving(build_classifier(cc), tmp_path / "cls", cc.image_size, classifier_last_conv(cc.backbone))]
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        sc = dataclasses.replace(config.segmenter, weights="none")
        exported.append(export_serving(build_segmenter(sc), tmp_path / "seg", sc.image_size))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for path in exported:
        general, _ = graph_ops(path)
        assert general - ALLOWED_OPS == set(), path
        check_graph(path)


def _fake_tflite(models: Path, blob: bytes) -> None:
    """A tflite section as `kmel export` writes it, for files of ``blob``."""
    import hashlib

    pipeline = json.loads((models / "pipeline.json").read_text())
    entry = {}
    for model in ("segmenter", "classifier"):
        path = models / "tflite" / f"{model}-float32.tflite"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
        entry[model] = {"file": f"tflite/{path.name}", "sha256": hashlib.sha256(blob).hexdigest(),
                        "source_fingerprint": pipeline[model]["fingerprint"]}
    pipeline["tflite"] = {"float32": entry}
    (models / "pipeline.json").write_text(json.dumps(pipeline))


def test_a_tampered_or_random_tflite_file_is_refused(made, tmp_path):
    models = _copy_models(made, tmp_path)
    _fake_tflite(models, os.urandom(4096))
    # Bytes that are not a TFLite model (the recorded SHA-256 matches): one line, not a crash.
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"], extra=("--runtime", "tflite")),
                    "not a TFLite model", "kmel export")
    # Same size, other bytes: refused by the SHA-256 before the interpreter reads it.
    path = models / "tflite" / "segmenter-float32.tflite"  # the first file loaded
    path.write_bytes(os.urandom(4096))
    _one_line_error(_predict(models, tmp_path / "p.csv", made["images"], extra=("--runtime", "tflite")),
                    str(path), "SHA-256")


def test_nan_scores_are_error_rows_never_ok(tmp_path):
    models = write_handmade_models(tmp_path / "models", extra="nan")
    write_image(tmp_path / "in" / "dark.jpg", 0, background=120)
    write_image(tmp_path / "in" / "bright.jpg", 1, background=250)
    result = _predict(models, tmp_path / "p.csv", tmp_path / "in")
    assert result.exit_code == 1, result.output
    rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("relpath")
    assert rows.loc["dark.jpg", "status"] == "ok"
    assert rows.loc["bright.jpg", "status"] == "error" and "not a number" in rows.loc["bright.jpg", "error"]
    assert rows.loc["bright.jpg", "label"] == ""


def test_an_output_is_never_appended_with_other_models_or_options(made, tmp_path):
    out = tmp_path / "p.csv"
    assert _predict(made["models"], out, made["images"]).exit_code == 0
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["tta"] is False and meta["classifier_fingerprint"]
    before = out.read_text()
    _one_line_error(_predict(made["other"], out, made["images"]), "classifier_fingerprint", "--overwrite")
    _one_line_error(_predict(made["models"], out, made["images"], extra=("--tta",)), "tta", "--overwrite")
    assert out.read_text() == before
    # --overwrite with a mistyped input: refused before the old rows are touched
    _one_line_error(_predict(made["models"], out, tmp_path / "typo", extra=("--tta", "--overwrite")), "typo")
    assert out.read_text() == before
    result = _predict(made["models"], out, made["images"], extra=("--tta", "--overwrite"))
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert len(rows) == 3 and rows["tta"].all()
    # An output without its meta file (an older kmel) is not appended to either.
    Path(str(out) + ".meta.json").unlink()
    _one_line_error(_predict(made["models"], out, made["images"], extra=("--tta",)), "meta.json", "--overwrite")


def test_error_rows_are_retried_and_added_inputs_do_not_duplicate(made, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(made["images"], folder / "a")
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "p.csv"
    assert _predict(made["models"], out, folder / "a").exit_code == 1
    write_image(folder / "a" / "broken.jpg", 7)  # the file comes back whole
    result = _predict(made["models"], out, folder / "a")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert len(rows) == 4 and (rows["status"] == "ok").all() and rows["relpath"].is_unique
    # One more input folder moves the common folder (relpaths gain "a/"): the same files are not redone.
    write_image(folder / "b" / "new.jpg", 8)
    result = _predict(made["models"], out, folder / "a", folder / "b")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert len(rows) == 5 and sorted(rows["image"]) == ["ISIC_0", "ISIC_1", "ISIC_2", "broken", "new"]


def test_a_file_name_that_is_not_utf8_keeps_its_row_and_resumes(made, tmp_path):
    folder = tmp_path / "in"
    write_image(folder / "ok.jpg", 0)
    write_image(Path(os.fsdecode(bytes(folder) + b"/ISIC_0000150_\xff.jpg")), 1)
    out = tmp_path / "p.csv"
    result = _predict(made["models"], out, folder)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert sorted(rows["relpath"]) == ["ISIC_0000150_\\xff.jpg", "ok.jpg"] and (rows["status"] == "ok").all()
    result = _predict(made["models"], out, folder)
    assert result.exit_code == 0 and "2 rows kept" in result.output, result.output
    assert len(pd.read_csv(out)) == 2


def test_unusable_output_locations_are_one_line(made, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.csv").mkdir()
    _one_line_error(_predict(made["models"], tmp_path / "adir.csv", made["images"]), "it is a folder")
    _one_line_error(_predict(made["models"], tmp_path / "afile" / "p.csv", made["images"]), "afile")
    result = _predict(made["models"], tmp_path / "p.csv", made["images"], extra=("--explain", str(tmp_path / "afile")))
    assert result.exit_code == 2 and "'--explain'" in result.output and "is a file" in result.output, result.output


@pytest.mark.parametrize("args", [
    ["predict", "IMAGES", "OUT", "--batch-size", "-1"],
    ["predict", "IMAGES", "OUT", "--batch-size", "0"],
    ["predict", "IMAGES", "OUT", "--max-file-mb", "0"],
    ["train", "seg", "--epochs", "0"],
    ["train", "cls", "--batch-size", "-4"],
    ["train", "seg", "--steps-per-epoch", "-1"],
    ["train", "cls", "--image-size", "0"],
    ["build-records", "--workers", "-1"],
    ["export", "--calibration-images", "0"],
])
def test_numeric_flags_out_of_range_are_usage_errors(made, tmp_path, args):
    args = [str(made["images"]) if a == "IMAGES" else str(tmp_path / "o.csv") if a == "OUT" else a for a in args]
    from kmel.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.csv").exists()


def test_a_second_writer_into_one_output_folder_stops_at_once(tmp_path):
    from kmel.data.locks import folder_lock
    from kmel.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=8, seed=0, size=64)
    build = ("build-records", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "rec"))
    with folder_lock(tmp_path / "rec", "build-records"):
        _one_line_error(_invoke(*build), "is being written by `kmel build-records` (pid")
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "rec").iterdir())
    # Released with the holder (a killed one too: the lock is the process's open file).
    result = _invoke(*build)
    assert result.exit_code == 0, result.output
    with folder_lock(tmp_path / "models", "train seg"):
        result = _invoke("train", "seg", "--records", str(tmp_path / "rec"), "--out", str(tmp_path / "models"))
        _one_line_error(result, "is being written by `kmel train seg`")


def test_two_files_of_one_image_id_with_different_content_are_reported(tmp_path):
    from kmel.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=8, seed=0, size=64)
    used = tmp_path / "data" / "images" / "2019" / "ISIC_9000001.jpg"
    twin = used.with_suffix(".JPG")
    twin.write_bytes((tmp_path / "data" / "images" / "2019" / "ISIC_9000002.jpg").read_bytes())
    (used.parent / "ISIC_9000003.JPG").write_bytes((used.parent / "ISIC_9000003.jpg").read_bytes())  # same bytes
    build = ("build-records", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "rec"))
    result = _invoke(*build)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    twins = manifest["cleaning"]["id_twins"]
    assert [t["image_id"] for t in twins] == ["ISIC_9000001"], twins
    assert manifest["problems"]["notes"]["image ids with two different files"] == 1
    skipped = pd.read_csv(tmp_path / "rec" / "skipped.csv")
    row = skipped[skipped["image_id"] == "ISIC_9000001"].iloc[0]
    assert "different content" in row["reason"] and row["path"] in (str(used), str(twin))
    assert _invoke(*build, "--strict").exit_code == 1


def test_a_fairness_report_of_one_image_is_a_clear_error_not_a_traceback():
    import numpy as np

    from kmel.data.records import DataError
    from kmel.evaluation.fairness import fairness_report

    with pytest.raises(DataError, match="at least 2 scored images, got 1"):
        fairness_report(np.array([1]), np.array([0.7]), 0.5, {"skin_tone": np.array(["light"])}, n_bootstrap=10)
    report = fairness_report(np.array([0, 1]), np.array([0.2, 0.7]), 0.5, {"skin_tone": np.array(["light"] * 2)},
                             n_bootstrap=10)
    assert "skin_tone" in report


def test_a_full_disk_while_rows_are_written_is_one_line_and_keeps_the_rows(made, tmp_path, monkeypatch):
    import errno

    from kmel.serving import outputs

    folder = tmp_path / "in"
    for i in range(4):
        write_image(folder / f"ISIC_{i}.jpg", i)
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second batch: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    out = tmp_path / "p.csv"
    result = _predict(made["models"], out, folder, extra=("--batch-size", "2"))
    _one_line_error(result, "the disk is full", str(out))
    kept = pd.read_csv(out)
    assert len(kept) >= 2 and (kept["status"] == "ok").all()
    monkeypatch.setattr(outputs.os, "fsync", real_fsync)
    result = _predict(made["models"], out, folder, extra=("--batch-size", "2"))
    assert result.exit_code == 0, result.output
    assert sorted(pd.read_csv(out)["relpath"]) == [f"ISIC_{i}.jpg" for i in range(4)]


def test_predict_prepares_images_with_the_crop_settings_the_classifier_learned_from():
    """train cls may run with other crop settings than train seg (another profile): the classifier's own
    record of them wins; models exported before it was recorded fall back to the segmenter's."""
    from kmel.config import load_config, to_plain
    from kmel.serving.runtime import config_from_pipeline

    config = load_config("cpu-small")
    seg_crops = to_plain(config.crops)
    cls_crops = {**seg_crops, "colour_constancy_p": 6.0, "margin": 0.3}
    pipeline = {"segmenter": {"records": to_plain(config.records), "crops": seg_crops,
                              "config": to_plain(config.segmenter)},
                "classifier": {"config": to_plain(config.classifier), "crops": cls_crops}}
    got = config_from_pipeline(pipeline).crops
    assert (got.colour_constancy_p, got.margin) == (6.0, 0.3)
    del pipeline["classifier"]["crops"]
    assert config_from_pipeline(pipeline).crops.colour_constancy_p == 0.0
