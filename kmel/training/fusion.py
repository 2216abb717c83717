"""Image + metadata fusion, the fitting side: LightGBM trees over the image model's validation scores and the
patients' tabular data (kmel/models/fusion.py applies them).

The scheme needs no retraining of the image model. The image classifier never trained on the validation split,
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
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from kmel import constants as C
from kmel.evaluation.calibration import fit_temperature
from kmel.evaluation.fairness import _clean, choose_threshold, partial_auc
from kmel.models.fusion import (
    FusionModel,
    FusionSpec,
    fusion_importance,
    make_fusion_features,
    make_fusion_spec,
    patient_groups,
)
from kmel.models.scores import sigmoid

__all__ = ["DEFAULT_PARAMS", "fit_fusion", "fusion_importance"]

# Small tabular data with rare positives: shallow trees, slow learning, row and column subsampling, deterministic.
# ``num_iterations`` caps each fold's rounds and ``early_stopping_round`` is their patience; both are kmel's keys
# here (taken out before LightGBM sees the rest).
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary", "metric": "auc", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "num_iterations": 2000, "early_stopping_round": 100, "deterministic": True, "force_row_wise": True,
    "num_threads": 1, "verbose": -1,
}


def _params(params: Mapping[str, Any] | None, seed: int) -> tuple[dict[str, Any], int, int]:
    merged = {**DEFAULT_PARAMS, "seed": seed, **(params or {})}
    rounds, patience = int(merged.pop("num_iterations")), int(merged.pop("early_stopping_round"))
    return merged, rounds, patience


def _dataset(x: np.ndarray, y: np.ndarray, spec: FusionSpec, reference: Any = None) -> Any:
    import lightgbm as lgb

    return lgb.Dataset(x, y, feature_name=list(spec.features), categorical_feature=[c for c, _ in spec.categorical],
                       reference=reference, free_raw_data=False)


def fit_fusion(
    val_table: pd.DataFrame, val_scores: Any, spec: FusionSpec | None = None, folds: int = 5, seed: int = 0,
    params: Mapping[str, Any] | None = None, threshold_method: str = "f1", image_fingerprint: str = "",
    label: str = C.COL_TARGET,
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

    Returns:
        The fitted model; ``metrics`` holds the out-of-fold validation AUC and partial AUC, fused and image-only.
    """
    import lightgbm as lgb

    y = pd.to_numeric(val_table[label], errors="coerce").to_numpy(np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"fusion: column {label!r} must be 0/1 on every validation row (fusion is binary)")
    y = y.astype(int)
    spec = spec or make_fusion_spec(val_table)
    x = make_fusion_features(val_table, val_scores, spec).to_numpy(np.float64)
    groups = patient_groups(val_table, spec.patient_column)
    positive_patients = len(np.unique(groups[y == 1]))
    if not 2 <= folds <= positive_patients:
        raise ValueError(f"fusion: {folds} folds need at least as many patients with a malignant lesion in "
                         f"validation, found {positive_patients}: lower folds (at least 2) or use more data")
    lgb_params, rounds, patience = _params(params, seed)
    oof = np.full(len(y), np.nan)
    best_iterations = []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (fit_rows, held_rows) in enumerate(splitter.split(x, y, groups)):
        if len(np.unique(y[held_rows])) < 2:
            raise ValueError(f"fusion: cross-fitting fold {fold} holds out no malignant lesion: lower folds")
        train = _dataset(x[fit_rows], y[fit_rows], spec)
        held = _dataset(x[held_rows], y[held_rows], spec, reference=train)
        booster = lgb.train(lgb_params, train, num_boost_round=rounds, valid_sets=[held],
                            callbacks=[lgb.early_stopping(patience, first_metric_only=True, verbose=False)])
        best_iterations.append(int(booster.best_iteration) or booster.current_iteration())
        oof[held_rows] = booster.predict(x[held_rows], num_iteration=best_iterations[-1], raw_score=True)
    n_trees = max(1, int(np.median(best_iterations)))
    final = lgb.train(lgb_params, _dataset(x, y, spec), num_boost_round=n_trees)

    temperature = fit_temperature(y, sigmoid(oof))  # the image model's calibration, reused
    fused = sigmoid(oof / temperature)
    threshold = choose_threshold(y, fused, method=threshold_method)
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
                       image_fingerprint=image_fingerprint, metrics=metrics)
