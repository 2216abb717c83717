"""Image + metadata fusion, the fitting side: LightGBM trees over the image model's validation scores and the
patients' tabular data (kmel/models/fusion.py applies them).

The trees start from the image model's logit (LightGBM's ``init_score``) and add what the metadata says to it:
with little to add, early stopping keeps few trees and the fused score stays the image score, rather than trees
re-learning the image score from a few hundred validation rows. The scheme needs no retraining of the image model. The image classifier never trained on the validation split,
so its validation scores are out-of-sample, as its scores on new patients will be; the trees are fitted on the
validation split only. Inside it, K-fold cross-fitting grouped by patient (``StratifiedGroupKFold``: a patient's
lesions, and so their patient-relative features, stay in one fold): each fold's trees early-stop on AUC on its
held-out patients, and the median best iteration sets the number of trees of the final fit on all of
validation. The out-of-fold fused scores choose the temperature (log loss) and the decision threshold and give
the reported validation metrics.

Leak risks, all small biases: validation also chose the image model's early-stopping epoch, threshold and
temperature, so its validation scores are a little better than truly new ones and the trees may lean on the image
score a little too much; each out-of-fold score comes from trees whose stopping round its own fold chose, so
the out-of-fold metrics flatter slightly (the test split is the honest figure). The cost: validation is smaller
than training (~15 % of the patients by default), so the trees see few malignant lesions; measure on the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from kmel import constants as C
from kmel.config import ConfigError
from kmel.evaluation.calibration import fit_temperature
from kmel.evaluation.fairness import _clean, choose_threshold, partial_auc
from kmel.models.fusion import (
    IMAGE_LOGIT,
    FusionError,
    FusionModel,
    FusionSpec,
    fusion_importance,
    make_fusion_features,
    make_fusion_spec,
    patient_groups,
)
from kmel.models.scores import sigmoid

__all__ = ["DEFAULT_PARAMS", "fit_fusion", "fusion_importance", "train_fusion"]

# Small tabular data with rare positives: shallow trees, slow learning, row and column subsampling, deterministic.
# ``num_iterations`` caps each fold's rounds and ``early_stopping_round`` is their patience; both are kmel's keys
# here (taken out before LightGBM sees the rest).
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary", "metric": "auc", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "num_iterations": 2000, "early_stopping_round": 100, "deterministic": True, "force_row_wise": True,
    "num_threads": 1, "verbose": -1,
}


FUSION_THRESHOLD_METHODS = ("f1", "youden", "sensitivity")  # no per-group floor: the trees see no skin tone


def _params(params: Mapping[str, Any] | None, seed: int) -> tuple[dict[str, Any], int, int]:
    merged = {**DEFAULT_PARAMS, "seed": seed, **(params or {})}
    rounds, patience = int(merged.pop("num_iterations")), int(merged.pop("early_stopping_round"))
    return merged, rounds, patience


def _dataset(x: np.ndarray, y: np.ndarray, spec: FusionSpec, reference: Any = None, init: Any = None) -> Any:
    import lightgbm as lgb

    return lgb.Dataset(x, y, feature_name=list(spec.features), categorical_feature=[c for c, _ in spec.categorical],
                       reference=reference, free_raw_data=False, init_score=init)


def fit_fusion(
    val_table: pd.DataFrame, val_scores: Any, spec: FusionSpec | None = None, folds: int = 5, seed: int = 0,
    params: Mapping[str, Any] | None = None, threshold_method: str = "f1", image_fingerprint: str = "",
    label: str = C.COL_TARGET, target_sensitivity: float = 0.9, image_offset: bool = True,
) -> FusionModel:
    """Fit the fusion trees on the validation split (the scheme in the module docstring).

    Args:
        val_table: the validation rows of the records table (``label`` 0/1, the metadata columns).
        val_scores: the image model's malignant probability per row, same order.
        spec: the features; None picks them from ``val_table`` (:func:`make_fusion_spec`).
        folds: cross-fitting folds, grouped by patient and stratified by label.
        seed: LightGBM's and the fold assignment's seed.
        params: LightGBM parameters over :data:`DEFAULT_PARAMS`.
        threshold_method: :func:`kmel.evaluation.fairness.choose_threshold`'s method ("f1", "youden", ...).
        image_fingerprint: the image model's fingerprint, checked when the fusion is loaded.
        label: the 0/1 label column.
        target_sensitivity: the recall the ``sensitivity`` threshold method keeps.
        image_offset: start the trees from the image logit (they learn what the metadata adds; early stopping
            keeps few trees when it adds little) rather than from the base rate.

    Returns:
        The fitted model; ``metrics`` holds the out-of-fold validation AUC and partial AUC, fused and image-only.
    """
    import lightgbm as lgb

    y = pd.to_numeric(val_table[label], errors="coerce").to_numpy(np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise FusionError(f"fusion: column {label!r} must be 0/1 on every validation row (fusion is binary)")
    y = y.astype(int)
    spec = spec or make_fusion_spec(val_table)
    frame = make_fusion_features(val_table, val_scores, spec)
    x = frame.to_numpy(np.float64)
    init = frame[IMAGE_LOGIT].to_numpy(np.float64) if image_offset else np.zeros(len(frame))
    groups = patient_groups(val_table, spec.patient_column)
    positive_patients = len(np.unique(groups[y == 1]))
    if not 2 <= folds <= positive_patients:
        raise FusionError(f"fusion: {folds} folds need at least as many patients with a malignant lesion in "
                         f"validation, found {positive_patients}: lower folds (at least 2) or use more data")
    lgb_params, rounds, patience = _params(params, seed)
    oof = np.full(len(y), np.nan)
    best_iterations = []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (fit_rows, held_rows) in enumerate(splitter.split(x, y, groups)):
        if len(np.unique(y[held_rows])) < 2:
            raise FusionError(f"fusion: cross-fitting fold {fold} holds out no malignant lesion: lower folds")
        train = _dataset(x[fit_rows], y[fit_rows], spec, init=init[fit_rows])
        held = _dataset(x[held_rows], y[held_rows], spec, reference=train, init=init[held_rows])
        booster = lgb.train(lgb_params, train, num_boost_round=rounds, valid_sets=[held],
                            callbacks=[lgb.early_stopping(patience, first_metric_only=True, verbose=False)])
        best_iterations.append(int(booster.best_iteration) or booster.current_iteration())
        oof[held_rows] = init[held_rows] + booster.predict(x[held_rows], num_iteration=best_iterations[-1],
                                                           raw_score=True)
    n_trees = max(1, int(np.median(best_iterations)))
    final = lgb.train(lgb_params, _dataset(x, y, spec, init=init), num_boost_round=n_trees)

    temperature = fit_temperature(y, sigmoid(oof))  # the image model's calibration, reused
    fused = sigmoid(oof / temperature)
    threshold = choose_threshold(y, fused, method=threshold_method, target_sensitivity=target_sensitivity)
    image = np.asarray(val_scores, dtype=np.float64).reshape(-1)
    known = ~np.isnan(image)
    metrics = _clean({
        "scheme": "trees fitted on validation; out-of-fold figures from cross-fitting grouped by patient",
        "n": len(y), "n_positive": int(y.sum()), "n_patients": len(np.unique(groups)), "folds": folds,
        "best_iterations": best_iterations, "n_features": len(spec.features),
        "oof_auc": roc_auc_score(y, fused), "oof_pauc80": partial_auc(y, fused),
        "image_auc": roc_auc_score(y[known], image[known]) if len(np.unique(y[known])) == 2 else None,
        "image_pauc80": partial_auc(y[known], image[known]),
        "threshold": threshold,
    })
    return FusionModel(spec=spec, booster_text=final.model_to_string(), n_trees=final.num_trees(),
                       threshold=float(threshold["threshold"]), temperature=temperature,
                       image_fingerprint=image_fingerprint, metrics=metrics, image_offset=image_offset)


def score_split_calibrated(
    model: Any, crops_dir: str | Path, split: str, config: Any, entry: Mapping[str, Any], progress: bool = False,
) -> pd.DataFrame:
    """The classifier's calibrated malignant probability on one split of crop records (what ``predict`` writes),
    one row per crop with its 0/1 ``target``, skin tone and the records' table columns."""
    from kmel.evaluation.evaluate import predict_records, read_record_table
    from kmel.models.heads import head_from_entry
    from kmel.models.pipeline import calibrate_outputs

    head = head_from_entry(dict(entry))
    table = predict_records(model, crops_dir, split, config, config.predict.batch_size, progress, head)
    outputs = table[head.class_columns].to_numpy(np.float64) if head.multiclass else table["probability"].to_numpy()
    _, table["probability"] = calibrate_outputs(head, outputs, float(entry.get("temperature", 1.0)))
    meta = read_record_table(crops_dir)
    if meta is not None:
        extra = [c for c in meta.columns if c not in table.columns]
        table = table.join(meta[extra], on=C.COL_IMAGE_ID)
    return table


def train_fusion(
    records_dir: str | Path, models_dir: str | Path, fusion_config: Any, progress: bool = True, checks: Any = None,
) -> dict[str, Any]:
    """``kmel train fusion``: fit the trees on the exported classifier's validation scores, report the test split.

    Scores val and test with the classifier SavedModel (calibrated, as ``predict`` does; its crop records are
    built when missing), joins the records' table (metadata.csv), fits :func:`fit_fusion` with
    ``fusion_config`` (:class:`kmel.config.FusionConfig`), writes MODELS/fusion/fusion.json with the resolved
    config beside it and the image-only vs fused report of the test split in MODELS/fusion/report/, and records
    the model (SHA-256, the classifier fingerprint it belongs to, threshold, metrics) in pipeline.json's
    ``fusion`` section, which it returns.
    """
    import hashlib

    from kmel.config import save_config
    from kmel.evaluation.evaluate import report_groups
    from kmel.evaluation.fusion import write_fusion_report
    from kmel.lesion.crops import ensure_crop_records
    from kmel.models.fusion import FUSION_DIR
    from kmel.models.integrity import DEFAULT_CHECKS, check_pipeline
    from kmel.models.pipeline import load_serving, read_pipeline
    from kmel.serving.export import update_pipeline
    from kmel.serving.runtime import config_from_pipeline

    checks = DEFAULT_CHECKS if checks is None else checks
    if fusion_config.threshold_method not in FUSION_THRESHOLD_METHODS:
        raise ConfigError(f"fusion.threshold_method must be one of {list(FUSION_THRESHOLD_METHODS)}, got "
                          f"{fusion_config.threshold_method!r}")
    models_dir = Path(models_dir)
    pipeline = read_pipeline(models_dir)
    config = config_from_pipeline(pipeline, models_dir)  # what the classifier was trained with: its crops, sizes
    check_pipeline(models_dir, pipeline, checks)
    entry = pipeline["classifier"]
    crops = ensure_crop_records(records_dir, models_dir, config, progress=progress, pipeline=pipeline, checks=checks)
    model = load_serving(models_dir / C.CLASSIFIER_DIR, checks, entry.get("fingerprint"))
    scored = {split: score_split_calibrated(model, crops, split, config, entry, progress) for split in ("val", "test")}
    val, test = scored["val"], scored["test"]
    if not len(val) or not len(test):
        raise FusionError(f"fusion: the records {records_dir} have {len(val)} validation and {len(test)} test crops; "
                         "both are needed (val to fit the trees, test to report them)")
    fc = fusion_config
    spec = make_fusion_spec(val, include=list(fc.include) or None, exclude=fc.exclude, relative=fc.relative)
    if not (spec.numeric or spec.categorical):
        raise FusionError(f"fusion: the records' table ({C.METADATA_CSV}) has no usable metadata column (age, sex, "
                         "site, measurements): nothing to fuse with the image score")
    params = {"learning_rate": fc.learning_rate, "num_leaves": fc.num_leaves, "min_data_in_leaf": fc.min_data_in_leaf}
    model_f = fit_fusion(val, val["probability"].to_numpy(), spec=spec, folds=fc.folds, seed=fc.seed, params=params,
                         threshold_method=fc.threshold_method, image_fingerprint=str(entry.get("fingerprint", "")),
                         target_sensitivity=fc.target_sensitivity, image_offset=fc.image_offset)
    folder = models_dir / FUSION_DIR
    path = model_f.save(folder)
    save_config(replace(config, fusion=fc), folder / "config.yaml")
    fused = model_f.predict(test, test["probability"].to_numpy())
    image_threshold = float(entry["threshold"])
    report = write_fusion_report(
        folder / "report", test[C.COL_TARGET].to_numpy(), test["probability"].to_numpy(), fused, image_threshold,
        model_f.threshold, report_groups(test), fusion_importance(model_f),
        meta={"split": "test", "records": str(records_dir), "models": str(models_dir), "n": len(test),
              "threshold_from": "val (out-of-fold fused scores)", "threshold_split": "val",
              "image_threshold": image_threshold, "features": list(spec.features)},
        n_bootstrap=fc.bootstrap, seed=fc.seed)
    test.assign(image_probability=test["probability"], probability=fused,
                prediction=(fused >= model_f.threshold).astype(int)).to_csv(folder / "report" / "predictions.csv",
                                                                             index=False)
    comparison = report["image_vs_fused"]["overall"]
    section = {
        "file": f"{FUSION_DIR}/{path.name}", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "image_fingerprint": model_f.image_fingerprint, "threshold": model_f.threshold,
        "temperature": model_f.temperature, "n_trees": model_f.n_trees, "features": list(spec.features),
        "val_out_of_fold": model_f.metrics, "report_split": "test",
        "metrics": {"n": comparison["n"], "n_positive": comparison["n_positive"],
                    "image_auc": comparison["auc"]["image"], "fused_auc": comparison["auc"]["fused"],
                    "image_pauc80": comparison["pauc80"]["image"], "fused_pauc80": comparison["pauc80"]["fused"]},
    }
    update_pipeline(models_dir, "fusion", section)
    return section
