"""`kmel train fusion`, `predict --metadata` and `evaluate` with a fusion model, through the CLI.

One synthetic record set (2019 + 2020 ISIC-style CSVs: age, sex, site, patient ids in 2020) and the hand-made
exported models of tests/handmade.py (no training): the fusion fits on their validation scores in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kmel import constants as C
from tests.handmade import write_handmade_models
from tests.tiny import write_tiny_profile


def _invoke(*args: str):
    from kmel.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusion-cli")
    profile = write_tiny_profile(root, 1, **{"fusion.folds": 2, "fusion.bootstrap": 50, "fusion.min_data_in_leaf": 5,
                                             "records.val_fraction": 0.35, "records.test_fraction": 0.25})
    made = _invoke("make-synthetic", root / "data", "--n-images", "120", "--size", "64")
    assert made.exit_code == 0, made.output
    built = _invoke("build-records", "--data-dir", root / "data", "--out", root / "records", "--profile", profile,
                    "--quiet")
    assert built.exit_code == 0, built.output
    models = write_handmade_models(root / "models")
    trained = _invoke("train", "fusion", "--records", root / "records", "--out", models, "--profile", profile,
                      "--quiet")
    return {"root": root, "profile": profile, "records": root / "records", "models": models, "train": trained}


def test_train_fusion_writes_a_json_model_its_report_and_the_pipeline_entry(fused):
    """exit 0; fusion.json is JSON (no pickle) and pipeline.json records its SHA-256 and the classifier it
    belongs to; the report has the fused scores' per-group tables and the image-only comparison, overall and
    per group; the resolved config (with its fusion section) is written beside the model."""
    import hashlib

    import yaml

    assert fused["train"].exit_code == 0, fused["train"].output
    assert "AUC image" in fused["train"].output
    models = fused["models"]
    path = models / "fusion" / "fusion.json"
    data = json.loads(path.read_text())
    assert data["format"] == "kmel-fusion" and data["image_offset"] is True and "booster" in data
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    entry = pipeline["fusion"]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["image_fingerprint"] == pipeline["classifier"]["fingerprint"] == data["image_fingerprint"]
    assert {"age", "sex", "site"} <= set(entry["features"])
    report = json.loads((models / "fusion" / "report" / "report.json").read_text())
    comparison = report["image_vs_fused"]
    assert comparison["overall"]["n"] == report["summary"]["n"] == entry["metrics"]["n"]
    assert set(comparison["overall"]["auc"]) >= {"image", "fused", "difference", "difference_ci95"}
    assert "skin_tone" in comparison["by_group"] and "skin_tone" in report["fairness"]
    assert set(comparison["importance_gain"]) == set(entry["features"])
    predictions = pd.read_csv(models / "fusion" / "report" / "predictions.csv")
    assert report["summary"]["auc"] == pytest.approx(comparison["overall"]["auc"]["fused"])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(predictions["target"], predictions["image_probability"]) == pytest.approx(
        comparison["overall"]["auc"]["image"])
    config = yaml.safe_load((models / "fusion" / "config.yaml").read_text())
    assert config["fusion"]["folds"] == 2 and config["fusion"]["min_data_in_leaf"] == 5
    assert "Image only vs fused" in (models / "fusion" / "report" / "report.md").read_text()


def test_train_fusion_refuses_network_flags(fused):
    result = _invoke("train", "fusion", "--records", fused["records"], "--out", fused["models"], "--epochs", "3",
                     "--backbone", "efficientnet_b0")
    assert result.exit_code == 2 and "--backbone, --epochs not used" in result.output


def _predict_inputs(fused, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Six of the records' test images in a folder, and their rows of the records' table."""
    table = pd.read_csv(fused["records"] / C.METADATA_CSV, dtype=str)
    rows = table[table["split"] == "test"].head(6)
    folder = tmp_path / "in"
    folder.mkdir()
    for _, row in rows.iterrows():
        shutil.copy(row[C.COL_IMAGE_PATH], folder / Path(row[C.COL_IMAGE_PATH]).name)
    return folder, rows.reset_index(drop=True)


def test_predict_metadata_fuses_the_listed_images_and_keeps_the_others(fused, tmp_path):
    """Four of six inputs are in the table (official ISIC column names, "MALE" in capitals, text in the age
    column, an extra row for no input): they get the fusion's probability, decision and threshold with fused=True;
    the other two keep the image model's with fused=False; image_probability is always the image model's. The
    fused values equal FusionModel.predict on the same rows. A rerun resumes without changing a row."""
    from kmel.models.fusion import load_fusion

    folder, rows = _predict_inputs(fused, tmp_path)
    listed = rows.head(4)
    table = pd.DataFrame({"isic_id": listed[C.COL_IMAGE_ID], "age_approx": listed[C.COL_AGE],
                          "sex": listed[C.COL_SEX].str.upper(), "anatom_site_general": listed[C.COL_SITE],
                          "patient_id": listed[C.COL_PATIENT]})
    table.loc[0, "age_approx"] = "unknown"
    table = pd.concat([table, pd.DataFrame({"isic_id": ["ISIC_NOT_AN_INPUT"], "age_approx": ["40"]})])
    meta = tmp_path / "meta.csv"
    table.to_csv(meta, index=False)
    out = tmp_path / "out.csv"
    result = _invoke("predict", folder, out, "--models", fused["models"], "--metadata", meta, "--quiet")
    assert result.exit_code == 0, result.output
    assert "fused with --metadata: 4 of the output's ok rows" in result.output
    got = pd.read_csv(out).set_index("image")
    assert got["fused"].to_dict() == {i: i in set(listed[C.COL_IMAGE_ID]) for i in rows[C.COL_IMAGE_ID]}
    fusion = load_fusion(fused["models"] / "fusion")
    ids = list(listed[C.COL_IMAGE_ID])
    features = table.head(4).rename(columns={"age_approx": C.COL_AGE, "anatom_site_general": C.COL_SITE})
    expected = fusion.predict(features.reset_index(drop=True), got.loc[ids, "image_probability"].to_numpy())
    np.testing.assert_allclose(got.loc[ids, "probability"], expected, atol=2e-6)
    assert (got.loc[ids, "threshold"] == fusion.threshold).all()
    assert (got.loc[ids, "prediction"] == (expected >= fusion.threshold).astype(int)).all()
    others = got[~got["fused"]]
    assert len(others) == 2 and (others["probability"] == others["image_probability"]).all()
    assert (others["threshold"] == 0.5).all()  # the image model's, from pipeline.json
    assert not np.allclose(got.loc[ids, "probability"], got.loc[ids, "image_probability"])
    again = _invoke("predict", folder, out, "--models", fused["models"], "--metadata", meta, "--quiet")
    assert again.exit_code == 0 and "6 rows kept" in again.output
    pd.testing.assert_frame_equal(pd.read_csv(out).set_index("image"), got)


def test_predict_metadata_errors_name_the_fix(fused, tmp_path):
    """A table matching no input, a missing file, a table without an id column and a models folder without a
    fusion model: each exit 2 with one line saying what to do, before any row is written."""
    folder, rows = _predict_inputs(fused, tmp_path)
    out = tmp_path / "out.csv"
    nothing = tmp_path / "nothing.csv"
    pd.DataFrame({"image": ["ISIC_X1", "ISIC_X2"], "age": [40, 50]}).to_csv(nothing, index=False)
    no_id = tmp_path / "no_id.csv"
    pd.DataFrame({"age": [40]}).to_csv(no_id, index=False)
    bare = tmp_path / "models"
    shutil.copytree(fused["models"], bare)
    pipeline = json.loads((bare / C.PIPELINE_JSON).read_text())
    del pipeline["fusion"]
    (bare / C.PIPELINE_JSON).write_text(json.dumps(pipeline))
    good = tmp_path / "good.csv"
    pd.DataFrame({"image": rows[C.COL_IMAGE_ID], "age": 50}).to_csv(good, index=False)
    cases = [((fused["models"], nothing), "describes none of the 6 inputs"),
             ((fused["models"], tmp_path / "absent.csv"), "no such file"),
             ((fused["models"], no_id), "has no id column"),
             ((bare, good), "needs a fusion model")]
    for (models, meta), message in cases:
        result = _invoke("predict", folder, out, "--models", models, "--metadata", meta, "--quiet")
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        assert not out.exists()


def test_a_retrained_classifier_makes_its_fusion_refused(fused, tmp_path):
    """The fusion was fitted on one classifier's scores: with another classifier in the folder (another
    fingerprint), predict --metadata refuses it and evaluate reports the image model without it, saying why."""
    models = tmp_path / "models"
    shutil.copytree(fused["models"], models)
    other = write_handmade_models(tmp_path / "other", scale=0.9)
    shutil.rmtree(models / "classifier")
    shutil.copytree(other / "classifier", models / "classifier")
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    pipeline["classifier"]["fingerprint"] = json.loads((other / C.PIPELINE_JSON).read_text())["classifier"]["fingerprint"]
    (models / C.PIPELINE_JSON).write_text(json.dumps(pipeline))
    folder, rows = _predict_inputs(fused, tmp_path)
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"image": rows[C.COL_IMAGE_ID], "age": 50}).to_csv(meta, index=False)
    result = _invoke("predict", folder, tmp_path / "out.csv", "--models", models, "--metadata", meta, "--quiet")
    assert result.exit_code == 2 and "refit the fusion" in result.output
    report = _invoke("evaluate", "--records", fused["records"], "--models", models, "--out", tmp_path / "rep",
                     "--quiet")
    assert report.exit_code == 0 and "fusion not evaluated" in report.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["fusion"]["evaluated"] is False


def test_evaluate_reports_image_only_and_fused_side_by_side(fused, tmp_path):
    """evaluate scores the split with the image model (report.json as always) and, with the folder's fusion
    model, writes fusion/report.json: the same rows' image AUC, the fused AUC and per-group tables."""
    out = tmp_path / "rep"
    result = _invoke("evaluate", "--records", fused["records"], "--models", fused["models"], "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "fusion: AUC image" in result.output
    main = json.loads((out / "report.json").read_text())
    side = json.loads((out / "fusion" / "report.json").read_text())
    assert main["fusion"]["evaluated"] is True
    assert side["image_vs_fused"]["overall"]["auc"]["image"] == pytest.approx(main["summary"]["auc"])
    assert main["fusion"]["fused_auc"] == pytest.approx(side["summary"]["auc"])
    trained = json.loads((fused["models"] / "fusion" / "report" / "report.json").read_text())
    assert side["image_vs_fused"]["overall"]["auc"]["fused"] == pytest.approx(
        trained["image_vs_fused"]["overall"]["auc"]["fused"])  # the same test split, the same fused scores
