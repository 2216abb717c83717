"""End to end on synthetic data through the CLI: records → seg → crops → cls → predict → evaluate.

The trained pipeline is the session's ``demo --quick`` run (tests/conftest.py: one CLI invocation that
makes the data, builds the records, trains both models and predicts; tests/test_demo.py checks it).
Every test here reuses its records and models; each CLI call is a real ``cli.py`` invocation through
click's CliRunner, so exit codes and messages are what users see. ``build-records`` and ``train`` on a
user's profile file are run through the CLI by tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kmel import constants as C

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _invoke(*args: str):
    from cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """The odd files a real folder holds; name -> expected status."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = (rng.uniform(0, 255, (80, 90, 3))).astype(np.uint8)
    ok_jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    (folder / "corrupt.jpg").write_bytes(ok_jpeg[: len(ok_jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    rgba = np.dstack([good, np.full(good.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(folder / "alpha.png"), rgba)
    cv2.imwrite(str(folder / "gray.png"), good[..., 0])
    cv2.imwrite(str(folder / "deep.png"), (good[..., 0].astype(np.uint16) * 257))
    return {"corrupt": "error", "empty": "error", "text": "error", "alpha": "ok", "gray": "ok", "deep": "ok"}


@pytest.fixture(scope="module")
def pipeline(quick_demo) -> dict:
    """The quick demo's records (64 synthetic images), trained models and held-out prediction folder."""
    from kmel.demo import demo_config

    assert quick_demo["result"].exit_code == 0, quick_demo["result"].output
    out = quick_demo["out"]
    return {"models": out / "saved_models", "records": out / "tfrecords", "predict": out / "predict_images",
            "config": demo_config(quick=True)}


def test_training_outputs_and_report(pipeline):
    models = pipeline["models"]
    pipe = json.loads((models / C.PIPELINE_JSON).read_text())
    assert {"segmenter", "classifier", "kmel_version"} <= set(pipe)
    cls = pipe["classifier"]
    assert 0.0 <= cls["threshold"] <= 1.0 and cls["threshold_choice"]["method"] == "f1_group_floor"
    assert cls["report_split"] == "test"
    report = json.loads((models / "report" / "report.json").read_text())
    assert report["meta"]["threshold_from"] == "val" and report["meta"]["split"] == "test"
    for name in ("report.md", "roc.png", "pr.png", "groups.png", "calibration.png", "predictions.csv"):
        assert (models / "report" / name).exists(), name
    crops = list(pipeline["records"].glob("crops-*/manifest.json"))
    assert len(crops) == 1
    manifest = json.loads(crops[0].read_text())
    assert manifest["segmenter_fingerprint"] == pipe["segmenter"]["fingerprint"] == cls["segmenter_fingerprint"]
    assert sum(manifest["n_records"]["crop"].values()) == 64
    # what the crops were made with is what predict will prepare images with
    assert cls["crops"] == manifest["config"]["crops"] and pipe["format_version"] == 1


def test_predict_handles_odd_files_and_writes_one_row_each(pipeline, tmp_path):
    folder = tmp_path / "in"
    expected = write_bad_inputs(folder)
    for p in sorted(pipeline["predict"].glob("*.jpg"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
        expected[p.stem] = "ok"
    out = tmp_path / "out.csv"
    result = _invoke("predict", str(folder), str(out), "--models", str(pipeline["models"]), "--quiet")
    assert result.exit_code == 1, result.output  # done, with skipped inputs reported
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(rows["image"]) == sorted(expected)
    assert dict(zip(rows["image"], rows["status"])) == expected
    ok = rows[rows["status"] == "ok"]
    probs = ok["probability"].astype(float)
    assert ((probs >= 0) & (probs <= 1)).all()
    entry = json.loads((pipeline["models"] / C.PIPELINE_JSON).read_text())["classifier"]
    assert np.allclose(ok["threshold"].astype(float), entry["threshold"])  # pipeline.json's, not the CSV's own
    assert (ok["prediction"].astype(int) == (probs >= entry["threshold"]).astype(int)).all()
    assert list(ok["label"]) == [entry["class_names"][int(p)] for p in ok["prediction"]]
    assert set(ok["crop_mode"]) <= set(C.CROP_MODES)
    assert set(ok["skin_tone_group"]) <= set(C.SKIN_TONE_GROUPS)
    errors = rows[rows["status"] == "error"]
    assert (errors["error"] != "").all() and (errors["probability"] == "").all()
    assert "3 errors" in result.output


def test_predict_resumes_without_duplicates(pipeline, tmp_path):
    folder = pipeline["predict"]
    out = tmp_path / "p.csv"
    assert _invoke("predict", str(folder), str(out), "--models", str(pipeline["models"]), "--quiet",
                   "--batch-size", "4").exit_code == 0
    full = out.read_text().splitlines()
    # A run killed after the first few rows, mid-way through writing the next one:
    out.write_text("\n".join(full[:4]) + "\n" + full[4][:10])
    result = _invoke("predict", str(folder), str(out), "--models", str(pipeline["models"]), "--quiet")
    assert result.exit_code == 0 and "3 rows kept" in result.output, result.output
    again = pd.read_csv(out, dtype=str)
    assert len(again) == len(full) - 1 and again["path"].is_unique
    first = pd.read_csv(tmp_path / "p.csv", dtype=str)
    assert sorted(first["image"]) == sorted(p.stem for p in folder.glob("*.jpg"))


def test_predict_tta_and_gradcam(pipeline, tmp_path):
    folder = pipeline["predict"]
    out, explain = tmp_path / "tta.csv", tmp_path / "cam"
    result = _invoke("predict", str(folder), str(out), "--models", str(pipeline["models"]), "--tta",
                     "--explain", str(explain), "--quiet")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert rows["tta"].all()
    pngs = sorted(explain.glob("*_gradcam.png"))
    assert len(pngs) == len(rows)
    image = cv2.imread(str(pngs[0]))
    assert image.shape == (64, 128, 3)  # crop | overlay at the classifier size


def test_evaluate_records_and_truth_csv(pipeline, tmp_path, pipeline_reads):
    import kmel.evaluation.evaluate  # noqa: F401  (the modules evaluate uses, loaded before reads are counted)

    reads = pipeline_reads
    result = _invoke("evaluate", "--records", str(pipeline["records"]), "--models", str(pipeline["models"]),
                     "--split", "test", "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    assert "score test" in result.output, "evaluate shows a progress bar unless --quiet"
    assert len(reads) == 1, "pipeline.json is read once per run"
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["meta"]["split"] == "test"
    folder = pipeline["predict"]
    _invoke("predict", str(folder), str(tmp_path / "p.csv"), "--models", str(pipeline["models"]), "--quiet")
    result = _invoke("evaluate", "--predictions", str(tmp_path / "p.csv"), "--truth", str(folder / "truth.csv"),
                     "--out", str(tmp_path / "rep2"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["meta"]["n"] == 8


def test_evaluate_tta_scores_the_mean_over_four_flips(pipeline, tmp_path):
    import tensorflow as tf

    from kmel.data.records import shard_paths
    from kmel.data.tfrecord import read_records

    models = pipeline["models"]
    pipe = json.loads((models / C.PIPELINE_JSON).read_text())
    for flag, out in (([], "plain"), (["--tta"], "tta")):
        result = _invoke("evaluate", "--records", str(pipeline["records"]), "--models", str(models), "--split", "test",
                         "--out", str(tmp_path / out), "--quiet", *flag)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "tta" / "report.json").read_text())["meta"]["tta"].startswith("flips")
    column = "probability_uncalibrated" if pipe["classifier"].get("temperature", 1.0) != 1.0 else "probability"
    plain = pd.read_csv(tmp_path / "plain" / "predictions.csv").set_index("image_id")[column]
    tta = pd.read_csv(tmp_path / "tta" / "predictions.csv").set_index("image_id")[column]
    # Expected, by hand: the exported classifier on each test crop and its three flips, averaged.
    serve = tf.saved_model.load(str(models / C.CLASSIFIER_DIR)).signatures["serve"]
    crops = shard_paths(pipeline["records"] / pipe["classifier"]["crops_dir"], "crop", "test")
    want = {}
    for record in read_records(crops):
        image = tf.io.decode_jpeg(record[C.F_IMAGE], channels=3).numpy().astype(np.float32)  # as evaluate decodes
        views = np.stack([image, image[:, ::-1], image[::-1], image[::-1, ::-1]])
        out = next(iter(serve(tf.constant(views)).values())).numpy().reshape(-1)
        want[record[C.F_IMAGE_ID]] = float(out.mean())
    got = tta.loc[list(want)].to_numpy()
    np.testing.assert_allclose(got, list(want.values()), atol=2e-5)
    assert np.abs(got - plain.loc[list(want)].to_numpy()).max() > 1e-4, "flips must change some score"


def test_user_errors_exit_2_without_traceback(tmp_path):
    result = _invoke("build-records", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    result = _invoke("train", "seg", "--records", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "build-records" in result.output
    result = _invoke("predict", str(tmp_path), str(tmp_path / "x.csv"), "--models", str(tmp_path / "none"))
    assert result.exit_code == 2 and "train" in result.output
    result = _invoke("build-records", "--profile", "nope")
    assert result.exit_code == 2 and "shipped profiles" in result.output


def test_every_command_has_help():
    for args in (["--help"], ["build-records", "--help"], ["train", "--help"], ["predict", "--help"],
                 ["evaluate", "--help"], ["demo", "--help"], ["make-synthetic", "--help"]):
        result = _invoke(*args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_csv_cells_are_formula_escaped():
    from kmel.serving.runner import escape_cell

    assert escape_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert escape_cell("@SUM") == "'@SUM" and escape_cell("ISIC_1") == "ISIC_1" and escape_cell(0.5) == 0.5
    assert escape_cell("-22.11") == "-22.11" and escape_cell("-1+2") == "'-1+2"



@pytest.mark.realdata
def test_predict_on_real_full_resolution_images(pipeline, shared_data, tmp_path):
    folder = shared_data / "isic-archive-fullres" / "images"
    out = tmp_path / "real.csv"
    result = _invoke("predict", str(folder), str(out), "--models", str(pipeline["models"]), "--quiet")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, dtype={"image": str})
    sizes = pd.read_csv(shared_data / "isic-archive-fullres" / "labels.csv").set_index("image_id")
    assert len(rows) == 24 and (rows["status"] == "ok").all() and rows["image"].is_unique
    for _, row in rows.iterrows():
        w, h = int(sizes.loc[row["image"], "width"]), int(sizes.loc[row["image"], "height"])
        # Boxes are in the original (camera-sized) pixels, not the working resolution.
        assert 0 <= row["box_x0"] < row["box_x1"] <= w and 0 <= row["box_y0"] < row["box_y1"] <= h
    assert rows["box_x1"].max() > 1000


def test_predict_killed_with_sigkill_then_rerun_loses_nothing(pipeline, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(pipeline["predict"].glob("*.jpg"))
    n = 120  # the kill lands after 12 rows: most of the run is still ahead
    for i in range(n):
        (folder / f"copy{i:03d}_{sources[i % len(sources)].name}").write_bytes(sources[i % len(sources)].read_bytes())
    out = tmp_path / "killed.csv"
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", str(folder), str(out), "--models", str(pipeline["models"]),
           "--batch-size", "2", "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n") - 1
    assert 10 <= written < n, f"the kill must land mid-run ({written} rows written)"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = pd.read_csv(out, dtype=str)
    assert len(rows) == n and rows["path"].is_unique and (rows["status"] == "ok").all()


def test_exported_classifier_matches_the_keras_model(pipeline):
    import keras
    import tensorflow as tf

    models = pipeline["models"]
    model = keras.saving.load_model(models / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
    serve = tf.saved_model.load(str(models / C.CLASSIFIER_DIR)).signatures["serve"]
    size = model.input_shape[1]
    batch = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    exported = next(iter(serve(tf.constant(batch)).values())).numpy().reshape(-1)
    np.testing.assert_allclose(exported, model.predict(batch, verbose=0).reshape(-1), atol=1e-5)
    history = pd.read_csv(models / "classifier_history.csv")
    entry = json.loads((models / C.PIPELINE_JSON).read_text())["classifier"]
    assert len(history) == entry["epochs_run"] == pipeline["config"].classifier.epochs  # one row per epoch
    assert np.isfinite(history["loss"]).all()


def test_classifier_under_mirrored_strategy_killed_and_resumed(pipeline, tmp_path):
    """`train cls` over two logical CPUs (MirroredStrategy), SIGKILLed after the first of two epochs; the
    same command again resumes from its backup, runs the second and ends with every epoch exactly once. A ResNet18
    classifier from scratch (its replicated train step traces in two thirds of EfficientNet-Lite0's time: a
    whole two-epoch run 70 s against 95 s); the demo's Lite0 and tests/tiny.py's B0 train through the same code."""
    import os
    import shutil
    import sys

    from kmel.config import to_plain
    from tests.processes import kill_then_rerun

    models = tmp_path / "models"
    shutil.copytree(pipeline["models"], models)  # the segmenter and its crop records are reused
    # The demo's crop settings, so its crop records are reused, not rebuilt.
    crops = {f"crops.{k}": v for k, v in to_plain(pipeline["config"].crops).items()}
    overrides = json.dumps({"classifier.backbone": "resnet18", "classifier.steps_per_epoch": 1, **crops})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(REPO / "tests/scripts/train_tiny.py"), "cls", str(pipeline["records"]), str(models),
           str(tmp_path / "runs"), "mirrored", "2", "2", "float32", overrides]
    history = models / "classifier_history.csv"
    work = models / ".run-classifier"  # where the run works until it is complete
    crop_stamps = {p: p.stat().st_mtime_ns for p in pipeline["records"].glob("crops-*/manifest.json")}
    result = kill_then_rerun(cmd, work / "classifier_history.csv", 1, work / ".backup-classifier", REPO, env)
    assert result["replicas"] == 2 and result["metrics"]["n"] > 0  # report on the test split
    assert pd.read_csv(history)["epoch"].tolist() == [0, 1], "no epoch repeated or lost across the kill"
    assert result["epochs_run"] == 2 and not work.exists()
    assert {p: p.stat().st_mtime_ns for p in pipeline["records"].glob("crops-*/manifest.json")} == crop_stamps


def test_threshold_is_chosen_on_val_not_on_the_reported_split(pipeline):
    """pipeline.json's threshold equals choose_threshold on the val predictions (calibrated by the stored
    temperature), says so in threshold_from, and is not what the test split would have chosen."""
    import keras

    from kmel.evaluation.evaluate import predict_records
    from kmel.evaluation.fairness import choose_threshold
    from kmel.models.pipeline import apply_temperature

    models = pipeline["models"]
    entry = json.loads((models / C.PIPELINE_JSON).read_text())["classifier"]
    assert entry["threshold_from"] == "val" and entry["report_split"] == "test"
    config = pipeline["config"]
    cc = config.classifier
    crops = pipeline["records"] / entry["crops_dir"]
    model = keras.saving.load_model(models / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)

    def chosen(split: str) -> float:
        table = predict_records(model, crops, split, config, cc.batch_size)
        probs = apply_temperature(table["probability"].to_numpy(), entry["temperature"])
        return choose_threshold(table["target"].to_numpy(), probs, method=cc.threshold_method,
                                groups=table["skin_tone_name"].to_numpy(), min_group_recall=cc.min_group_recall,
                                target_sensitivity=cc.target_sensitivity)["threshold"]

    assert entry["threshold"] == pytest.approx(chosen("val"), abs=1e-6)
    assert entry["threshold"] != pytest.approx(chosen("test"), abs=1e-6)
    report = (models / "report" / "report.md").read_text()
    assert "chosen on: val" in report and "chosen on the `val` split" in report


def test_predict_probabilities_are_the_classifiers(pipeline, tmp_path):
    """Each CSV probability is the exported classifier's output on the crop CropPipeline makes, calibrated by
    pipeline.json's temperature (to 1e-5); with --tta, the mean over the four flips. Decision, label and
    threshold come from pipeline.json, not from the CSV itself."""
    import tensorflow as tf

    from kmel.data.images import load_image
    from kmel.lesion.crops import CropPipeline, make_segment_fn
    from kmel.models.pipeline import apply_temperature, load_serving
    from kmel.serving.runtime import load_pipeline_config

    models, folder = pipeline["models"], tmp_path / "in"
    folder.mkdir()
    for source in sorted(pipeline["predict"].glob("*.jpg"))[:3]:
        (folder / source.name).write_bytes(source.read_bytes())
    files = sorted(folder.glob("*.jpg"))
    config, pipe = load_pipeline_config(models)
    entry = pipe["classifier"]
    serve = load_serving(models / C.CLASSIFIER_DIR).signatures["serve"]
    segment, seg_size = make_segment_fn(models, pipe)
    with CropPipeline(segment, seg_size, config, workers=1) as crops:
        batch = np.stack([p.result.crop for p in crops.run([load_image(f) for f in files])]).astype(np.float32)

    def classify(x: np.ndarray) -> np.ndarray:
        return next(iter(serve(tf.constant(x)).values())).numpy().reshape(-1)

    plain = classify(batch)
    flipped = np.mean([plain, classify(batch[:, :, ::-1]), classify(batch[:, ::-1]), classify(batch[:, ::-1, ::-1])],
                      axis=0)
    assert np.abs(flipped - plain).max() > 1e-4, "the flips must change something for this test to mean anything"
    for tta, raw in ((False, plain), (True, flipped)):
        out = tmp_path / f"tta-{tta}.csv"
        result = _invoke("predict", str(folder), str(out), "--models", str(models), "--quiet",
                         *(["--tta"] if tta else []))
        assert result.exit_code == 0, result.output
        rows = pd.read_csv(out).set_index("image").loc[[f.stem for f in files]]
        want = apply_temperature(raw, entry["temperature"])
        np.testing.assert_allclose(rows["probability"].to_numpy(), want, atol=1e-5)
        assert np.allclose(rows["threshold"], entry["threshold"])
        decision = (want >= entry["threshold"]).astype(int)
        assert list(rows["prediction"]) == list(decision)
        assert list(rows["label"]) == [entry["class_names"][d] for d in decision]
        assert rows["tta"].astype(bool).all() == tta


def test_make_synthetic_command_writes_data_and_a_prediction_folder(tmp_path):
    """The CLI's make-synthetic (the shared pipeline draws its data through the library inside `demo`)."""
    result = _invoke("make-synthetic", str(tmp_path / "data"), "--n-images", "8", "--size", "64", "--seed", "5",
                     "--predict-images", "2")
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "data").glob("*.csv")) and len(list((tmp_path / "data").rglob("*.jpg"))) >= 8 + 2
    truth = pd.read_csv(tmp_path / "data" / "predict" / "truth.csv")
    assert len(truth) == 2 and len(list((tmp_path / "data" / "predict").glob("*.jpg"))) == 2
