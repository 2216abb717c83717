"""Image + metadata fusion (kmel/models/fusion.py, kmel/training/fusion.py): features checked by hand, the choice
of columns, a fit on synthetic ISIC 2024 metadata that beats the image score alone, the JSON round trip and its
refusals, determinism. No TensorFlow."""

from __future__ import annotations

import ast
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kmel.data.formats import FORMATS, CsvTable
from kmel.data.synthetic_isic2024 import TBP_LV_COLUMNS, make_isic2024_metadata
from kmel.evaluation.fairness import partial_auc
from kmel.models import fusion as models_fusion
from kmel.models.fusion import (
    FUSION_JSON,
    IMAGE_LOGIT,
    PATIENT_COUNT,
    load_fusion,
    make_fusion_features,
    make_fusion_spec,
    patient_groups,
)
from kmel.training import fusion as training_fusion
from kmel.training.fusion import fit_fusion, fusion_importance

TEXT_TBP = ("tbp_lv_location", "tbp_lv_location_simple")


def _records(n: int, seed: int, malignant: float, hidden: float) -> pd.DataFrame:
    """Synthetic ISIC 2024 rows through kmel's reader (the records table's columns); ``hidden`` of the malignant
    rows get a benign row's lesion measurements, so that only the image score finds them."""
    raw = make_isic2024_metadata(n, seed=seed, malignant_fraction=malignant)
    text = pd.read_csv(io.StringIO(raw.to_csv(index=False)), dtype=str)
    table = FORMATS["isic2024"].read(CsvTable(Path("train-metadata.csv"), list(text.columns), text))
    table["target"] = table["malignant"].astype(int)
    rng = np.random.default_rng([seed, 1])
    bad, good = np.flatnonzero(table["target"] == 1), np.flatnonzero(table["target"] == 0)
    hide = rng.choice(bad, round(hidden * len(bad)), replace=False)
    # The site goes with the location: a hidden row whose site disagreed with its tbp_lv_location would stand out.
    cols = [c for c in table.columns if c.startswith("tbp_lv_") or c in ("clin_size_long_diam_mm", "site")]
    table.loc[hide, cols] = table.loc[rng.choice(good, len(hide)), cols].to_numpy()
    return table


def _image_score(table: pd.DataFrame, seed: int) -> np.ndarray:
    """A weak image model: logit = −3 + target + a per-patient offset + noise."""
    rng = np.random.default_rng([seed, 2])
    groups = patient_groups(table)
    offset = rng.normal(0, 0.7, groups.max() + 1)[groups]
    logit = -3.0 + table["target"].to_numpy() + offset + rng.normal(0, 1, len(table))
    return 1.0 / (1.0 + np.exp(-logit))


@pytest.fixture(scope="module")
def fitted() -> dict:
    table = _records(6000, seed=0, malignant=0.05, hidden=0.5)
    score = _image_score(table, seed=0)
    groups = patient_groups(table)
    is_val = groups % 2 == 0
    val, test = table[is_val].reset_index(drop=True), table[~is_val].reset_index(drop=True)
    model = fit_fusion(val, score[is_val], seed=0, image_fingerprint="image-model-A")
    return {"val": val, "val_score": score[is_val], "test": test, "test_score": score[~is_val], "model": model}


# === Features ===


def test_features_by_hand():
    train = pd.DataFrame({
        "image_id": ["a", "b", "c", "d"], "patient_id": ["p1", "p1", "p2", "p2"], "target": [0, 1, 0, 0],
        "split": "val", "age": [50.0, 50.0, 60.0, 60.0], "size_mm": [1.0, 2.0, 3.0, 4.0],
        "itch": ["True", "False", "True", "False"], "sex": ["male", "female", "male", "female"],
        "site": ["back", "leg", "back", "arm"],
    })
    spec = make_fusion_spec(train)
    assert spec.numeric == ("age", "size_mm", "itch")
    assert dict(spec.categorical) == {"sex": ("female", "male"), "site": ("arm", "back", "leg")}
    table = pd.DataFrame({
        "patient_id": ["p1", "p1", "p1", "p2", None, None],
        "age": [50, 50, 50, 60, 70, np.nan],
        "size_mm": [1.0, 2.0, 3.0, 5.0, "abc", "4"],  # text in a numeric column: NaN, "4" read as 4
        "itch": ["True", "false", None, "True", "maybe", "False"],
        "sex": ["male", "female", "other", None, "male", "female"],  # "other" unknown to the spec
    })  # no "site": a missing column
    assert spec.missing_columns(table.columns) == ("site",)
    f = make_fusion_features(table, [0.5, 0.5, 0.5, 0.5, 0.0, 1.0], spec)
    assert tuple(f.columns) == spec.features and (f.dtypes == np.float64).all()
    np.testing.assert_allclose(f[IMAGE_LOGIT], [0, 0, 0, 0, math.log(1e-6 / (1 - 1e-6)), math.log((1 - 1e-6) / 1e-6)])
    np.testing.assert_array_equal(f["size_mm"], [1, 2, 3, 5, np.nan, 4])
    np.testing.assert_array_equal(f["itch"], [1, 0, np.nan, 1, np.nan, 0])
    np.testing.assert_array_equal(f["sex"], [1, 0, np.nan, np.nan, 1, 0])
    assert f["site"].isna().all()
    # p1's sizes 1, 2, 3: mean 2, population std sqrt(2/3); mid-rank percentiles 1/6, 1/2, 5/6.
    z = 1 / math.sqrt(2 / 3)
    np.testing.assert_allclose(f["size_mm_pz"], [-z, 0, z, 0, np.nan, 0])
    np.testing.assert_allclose(f["size_mm_prank"], [1 / 6, 1 / 2, 5 / 6, 0.5, np.nan, 0.5])
    np.testing.assert_array_equal(f["age_pz"], [0, 0, 0, 0, 0, np.nan])  # no spread within p1
    np.testing.assert_array_equal(f["itch_prank"], [0.75, 0.25, np.nan, 0.5, np.nan, 0.5])  # p1: 1, 0 (one missing)
    np.testing.assert_array_equal(f[f"{IMAGE_LOGIT}_pz"], [0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(f[PATIENT_COUNT], [3, 3, 3, 1, 1, 1])  # no patient id: a patient of one


def test_features_keep_the_table_index_and_need_one_score_per_row():
    train = pd.DataFrame({"patient_id": ["p", "p", "q"], "x": [1.0, 2.0, 3.0]})
    spec = make_fusion_spec(train)
    f = make_fusion_features(train.set_axis([7, 7, 9]), [0.1, 0.2, 0.3], spec)
    assert list(f.index) == [7, 7, 9] and f["x_prank"].tolist() == [0.25, 0.75, 0.5]
    with pytest.raises(ValueError, match="2 image scores for 3 table rows"):
        make_fusion_features(train, [0.1, 0.2], spec)


def test_spec_leaves_out_ids_and_labels_and_picks_tbp_columns():
    raw = make_isic2024_metadata(400, seed=0)  # as published: labels, pathology and ids among the columns
    raw["empty"] = np.nan
    spec = make_fusion_spec(raw)
    numeric_tbp = [c for c in TBP_LV_COLUMNS if c not in TEXT_TBP]
    assert set(numeric_tbp) | {"age_approx", "clin_size_long_diam_mm"} == set(spec.numeric)
    assert {"sex", "anatom_site_general", "tbp_tile_type", *TEXT_TBP} == {c for c, _ in spec.categorical}
    for col in ("isic_id", "target", "patient_id", "lesion_id", "iddx_1", "iddx_full", "mel_thick_mm",
                "mel_mitotic_index", "tbp_lv_dnn_lesion_confidence", "image_type", "empty", "attribution"):
        assert col not in spec.columns, col

    records = _records(300, seed=1, malignant=0.05, hidden=0.0)
    records["split"], records["skin_tone"], records["sha256"] = "val", 2, "ab"
    spec = make_fusion_spec(records, exclude=("tbp_lv_x",))
    assert {"age", "sex", "site"} <= set(spec.columns) and "tbp_lv_x" not in spec.columns
    assert not {"image_id", "source", "year", "diagnosis", "malignant", "melanoma", "target", "split", "skin_tone",
                "sha256", "fitzpatrick", "base_id", "patient_id"} & set(spec.columns)
    assert make_fusion_spec(records, include=["age", "sex"], relative=False).features == (IMAGE_LOGIT, "age", "sex")
    with pytest.raises(ValueError, match="target"):
        make_fusion_spec(records, include=["age", "target"])


# === Fitting ===


def test_fusion_beats_the_image_score_alone(fitted):
    model, y = fitted["model"], fitted["test"]["target"].to_numpy()
    fused = model.predict(fitted["test"], fitted["test_score"])
    image = fitted["test_score"]
    assert ((fused >= 0) & (fused <= 1)).all()
    # Measured: fused 0.857 / 0.091, image 0.717 / 0.064, the metadata alone 0.778 / 0.054 (AUC / partial AUC).
    assert roc_auc_score(y, fused) >= roc_auc_score(y, image) + 0.10
    assert partial_auc(y, fused) > partial_auc(y, image) + 0.01
    assert model.metrics["oof_auc"] > model.metrics["image_auc"]
    assert 0 < model.threshold < 1 and 0.2 < model.temperature < 5 and model.n_trees >= 1
    importance = fusion_importance(model)
    assert math.isclose(sum(importance.values()), 1.0) and set(importance) == set(model.spec.features)
    assert sum(v for k, v in importance.items() if k.endswith(("_pz", "_prank"))) > 0  # patient-relative ones used


def test_same_seed_same_predictions(fitted):
    again = fit_fusion(fitted["val"], fitted["val_score"], seed=0, image_fingerprint="image-model-A")
    a = fitted["model"].predict(fitted["test"], fitted["test_score"])
    np.testing.assert_array_equal(again.predict(fitted["test"], fitted["test_score"]), a)
    assert again.booster_text == fitted["model"].booster_text


def test_fit_refuses_too_few_malignant_patients_and_non_binary_labels(fitted):
    val = fitted["val"].copy()
    val["target"] = 0
    val.loc[0, "target"] = 1
    with pytest.raises(ValueError, match="folds"):
        fit_fusion(val, fitted["val_score"])
    val.loc[1, "target"] = 2
    with pytest.raises(ValueError, match="0/1"):
        fit_fusion(val, fitted["val_score"])


# === Saving and loading ===


def test_save_load_round_trip(fitted, tmp_path):
    model = fitted["model"]
    path = model.save(tmp_path / "fusion")
    assert path.name == FUSION_JSON and not list(path.parent.glob("*.partial"))
    data = json.loads(path.read_text())  # one plain JSON file: spec, booster text, calibration, importance
    assert data["spec"]["features"] == list(model.spec.features) and data["booster"].startswith("tree")
    assert math.isclose(sum(data["importance_gain"].values()), 1.0)
    loaded = load_fusion(tmp_path / "fusion", image_fingerprint="image-model-A")
    assert loaded.spec == model.spec and loaded.threshold == model.threshold
    assert loaded.temperature == model.temperature and loaded.metrics == json.loads(json.dumps(model.metrics))
    np.testing.assert_array_equal(loaded.predict(fitted["test"], fitted["test_score"]),
                                  model.predict(fitted["test"], fitted["test_score"]))


def test_fusion_modules_do_not_start_tensorflow():
    code = ("import sys, kmel.models.fusion, kmel.training.fusion; "
            "sys.exit(sorted({'tensorflow', 'keras'} & set(sys.modules)) or 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr or result.stdout


def test_no_pickle_in_the_fusion_modules():
    for module in (models_fusion, training_fusion):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"pickle", "joblib", "cloudpickle", "dill"}, module.__name__


def test_load_refuses_another_image_model_and_edited_files(fitted, tmp_path):
    folder = tmp_path / "fusion"
    path = fitted["model"].save(folder)
    with pytest.raises(ValueError, match="image model 'image-model-A', not 'image-model-B'"):
        load_fusion(folder, image_fingerprint="image-model-B")
    original = json.loads(path.read_text())

    def edited(change) -> None:
        data = json.loads(json.dumps(original))
        change(data)
        path.write_text(json.dumps(data))

    def swap_two_columns(data: dict) -> None:  # consistent within the spec, not with the booster
        spec = data["spec"]
        a, b = spec["numeric"][:2]
        spec["numeric"][:2] = [b, a]
        spec["features"] = [{a: b, b: a}.get(f, f) for f in spec["features"]]
        spec["features"] = [{f"{a}_pz": f"{b}_pz", f"{b}_pz": f"{a}_pz", f"{a}_prank": f"{b}_prank",
                             f"{b}_prank": f"{a}_prank"}.get(f, f) for f in spec["features"]]

    edited(swap_two_columns)
    with pytest.raises(ValueError, match="disagrees with its booster"):
        load_fusion(folder)
    edited(lambda d: d["spec"]["features"].pop())
    with pytest.raises(ValueError, match="edited"):
        load_fusion(folder)
    edited(lambda d: d.update(format_version=99))
    with pytest.raises(ValueError, match="refit"):
        load_fusion(folder)
