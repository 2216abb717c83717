"""Image + metadata fusion: LightGBM or scikit-learn's HistGradientBoosting? Both against the image score alone.

usage: python bench/fusion_gbm.py [--n 20000] [--malignant 0.02] [--strength 1.0] [--patient-sd 0.7]
                                  [--hidden 0.5] [--boot 200] [--seed 0] [--out bench/out/fusion-gbm]

Data: :func:`kmel.data.synthetic_isic2024.make_isic2024_metadata` read by kmel's ISIC 2024 reader (the records
table's columns), ``target`` = malignant. Its malignant rows' measurements are shifted enough for trees to find
nearly all of them, so ``--hidden`` of the malignant rows get the lesion measurements (every ``tbp_lv_*``,
``clin_size_long_diam_mm`` and the ``site`` that goes with the location) of a random benign row: only the image score can find those. The simulated image
score of known strength: logit = −3 + strength × target + a per-patient offset N(0, patient-sd²) (a patient
whose lesions all score high: what the patient-relative features remove) + N(0, 1) per lesion.

Patients are split in half, validation and test. Methods, all scored on test:
- ``image``: the image score alone;
- ``lightgbm``: :func:`kmel.training.fusion.fit_fusion` on validation (5-fold cross-fitting by patient, median
  best round, final fit on all of validation), the trees starting from the image logit (kmel's default);
- ``lgb_no_offset``: the same with the trees starting from the base rate (the image logit only a feature);
- ``hgb``: ``HistGradientBoostingClassifier`` on the same features (:func:`kmel.models.fusion.make_fusion_features`,
  categoricals as categorical): early stopping on AUC on an inner 20 % of validation patients, then refitted on
  all of validation with that many rounds; the same tree size, rate, L2 and thread count (no row bagging: it
  has none).

AUC and partial AUC above 80 % TPR (the ISIC 2024 metric) with 95 % percentile intervals from ``--boot``
resamples of the test *patients* (all of a patient's lesions together; the same resamples for every method, so
differences are paired), and fit seconds. Prints a table and writes OUT/result.json. HGB has no text format: it is
saved with pickle unless kmel serialises its trees itself; LightGBM saves as text (``model_to_string``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _common import OUT, Timer

from kmel.data.formats import FORMATS, CsvTable
from kmel.data.synthetic_isic2024 import make_isic2024_metadata
from kmel.evaluation.fairness import partial_auc
from kmel.models.fusion import make_fusion_features, make_fusion_spec, patient_groups
from kmel.training.fusion import DEFAULT_PARAMS, fit_fusion

MEASUREMENTS_PREFIX = "tbp_lv_"
# The site goes with the location: a hidden row whose site disagreed with its tbp_lv_location would stand out
# (trees that split on both categoricals found the hidden rows that way).
DONATED = ("clin_size_long_diam_mm", "site")


def make_table(n: int, malignant: float, hidden: float, seed: int) -> pd.DataFrame:
    """Synthetic ISIC 2024 rows as kmel's records table, ``hidden`` of the malignant ones measured like benign ones."""
    raw = make_isic2024_metadata(n, seed=seed, malignant_fraction=malignant)
    text = pd.read_csv(io.StringIO(raw.to_csv(index=False)), dtype=str)
    table = FORMATS["isic2024"].read(CsvTable(Path("train-metadata.csv"), list(text.columns), text))
    table["target"] = table["malignant"].astype(int)
    rng = np.random.default_rng([seed, 1])
    bad = np.flatnonzero(table["target"].to_numpy() == 1)
    hide = rng.choice(bad, round(hidden * len(bad)), replace=False)
    donors = rng.choice(np.flatnonzero(table["target"].to_numpy() == 0), len(hide))
    cols = [c for c in table.columns if c.startswith(MEASUREMENTS_PREFIX) or c in DONATED]
    table.loc[hide, cols] = table.loc[donors, cols].to_numpy()
    return table


def make_image_score(table: pd.DataFrame, strength: float, patient_sd: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    groups = patient_groups(table)
    logit = (-3.0 + strength * table["target"].to_numpy() + rng.normal(0, patient_sd, groups.max() + 1)[groups]
             + rng.normal(0, 1, len(table)))
    return 1.0 / (1.0 + np.exp(-logit))


def fit_hgb(val: pd.DataFrame, scores: np.ndarray, seed: int) -> tuple[object, object, int]:
    """HGB on the fusion features: early stopping on an inner 20 % of patients, then a refit on all of val."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedGroupKFold
    from threadpoolctl import threadpool_limits

    spec = make_fusion_spec(val)
    x = make_fusion_features(val, scores, spec).to_numpy(np.float64)
    y = val["target"].to_numpy()
    categorical = np.isin(spec.features, [c for c, _ in spec.categorical])
    p = DEFAULT_PARAMS
    settings = {"learning_rate": p["learning_rate"], "max_leaf_nodes": p["num_leaves"],
                "min_samples_leaf": p["min_data_in_leaf"], "l2_regularization": p["lambda_l2"],
                "max_features": p["feature_fraction"], "categorical_features": categorical, "random_state": seed}
    inner = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
    fit_rows, held_rows = next(inner.split(x, y, patient_groups(val)))
    probe = HistGradientBoostingClassifier(max_iter=p["num_iterations"], early_stopping=True, scoring="roc_auc",
                                           n_iter_no_change=p["early_stopping_round"], **settings)
    with threadpool_limits(p["num_threads"]):  # one OpenMP thread, as LightGBM's default: a fair race
        probe.fit(x[fit_rows], y[fit_rows], X_val=x[held_rows], y_val=y[held_rows])
        rounds = max(1, probe.n_iter_ - p["early_stopping_round"])
        model = HistGradientBoostingClassifier(max_iter=rounds, early_stopping=False, **settings).fit(x, y)
    return model, spec, rounds


def bootstrap(y: np.ndarray, groups: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """AUC and pAUC per method and their paired differences, on resamples of whole patients."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng([seed, 3])
    patients = np.unique(groups)
    rows_of = {g: np.flatnonzero(groups == g) for g in patients}
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.choice(patients, len(patients))])
        if len(np.unique(y[rows])) < 2:
            continue
        values = {}
        for name, s in scores.items():
            values[f"{name}_auc"] = roc_auc_score(y[rows], s[rows])
            values[f"{name}_pauc80"] = partial_auc(y[rows], s[rows])
        for metric in ("auc", "pauc80"):
            values[f"lightgbm_minus_image_{metric}"] = values[f"lightgbm_{metric}"] - values[f"image_{metric}"]
            values[f"lightgbm_minus_hgb_{metric}"] = values[f"lightgbm_{metric}"] - values[f"hgb_{metric}"]
            values[f"lightgbm_minus_lgb_no_offset_{metric}"] = values[f"lightgbm_{metric}"] - values[f"lgb_no_offset_{metric}"]
        for k, v in values.items():
            draws.setdefault(k, []).append(float(v))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def main() -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--malignant", type=float, default=0.02)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--patient-sd", type=float, default=0.7)
    ap.add_argument("--hidden", type=float, default=0.5)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "fusion-gbm")
    args = ap.parse_args()

    table = make_table(args.n, args.malignant, args.hidden, args.seed)
    score = make_image_score(table, args.strength, args.patient_sd, args.seed)
    groups = patient_groups(table)
    patients = np.random.default_rng([args.seed, 4]).permutation(groups.max() + 1)
    is_val = np.isin(groups, patients[: len(patients) // 2])
    val, test = table[is_val].reset_index(drop=True), table[~is_val].reset_index(drop=True)
    y = test["target"].to_numpy()

    with Timer() as t_lgb:
        fusion = fit_fusion(val, score[is_val], seed=args.seed)
    with Timer() as t_plain:
        plain = fit_fusion(val, score[is_val], seed=args.seed, image_offset=False)
    with Timer() as t_hgb:
        hgb, spec, hgb_rounds = fit_hgb(val, score[is_val], args.seed)
    scores = {"image": score[~is_val], "lightgbm": fusion.predict(test, score[~is_val]),
              "lgb_no_offset": plain.predict(test, score[~is_val]),
              "hgb": hgb.predict_proba(make_fusion_features(test, score[~is_val], spec).to_numpy(np.float64))[:, 1]}
    intervals = bootstrap(y, patient_groups(test), scores, args.boot, args.seed)
    seconds = {"image": 0.0, "lightgbm": t_lgb.seconds, "lgb_no_offset": t_plain.seconds, "hgb": t_hgb.seconds}
    rows = {name: {"auc": float(roc_auc_score(y, s)), "pauc80": partial_auc(y, s), "fit_s": seconds[name],
                   "auc_ci95": intervals[f"{name}_auc"], "pauc80_ci95": intervals[f"{name}_pauc80"]}
            for name, s in scores.items()}

    print(f"val {len(val)} rows ({int(val['target'].sum())} malignant), test {len(test)} rows "
          f"({int(y.sum())} malignant); {len(fusion.spec.features)} features; lightgbm {fusion.n_trees} trees "
          f"(folds' best {fusion.metrics['best_iterations']}), hgb {hgb_rounds} rounds")
    print(f"{'method':<10} {'AUC':>7} {'95% CI':>17} {'pAUC80':>7} {'95% CI':>17} {'fit s':>7}")
    for name, r in rows.items():
        print(f"{name:<10} {r['auc']:7.4f} [{r['auc_ci95'][0]:.4f}, {r['auc_ci95'][1]:.4f}] {r['pauc80']:7.4f} "
              f"[{r['pauc80_ci95'][0]:.4f}, {r['pauc80_ci95'][1]:.4f}] {r['fit_s']:7.2f}")
    for k, v in intervals.items():
        if "_minus_" in k:
            print(f"{k:<30} 95% CI [{v[0]:+.4f}, {v[1]:+.4f}]")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
              "bootstrap": f"{args.boot} resamples of test patients (paired across methods), percentile 95 % CI",
              "n_val": len(val), "n_val_malignant": int(val["target"].sum()), "n_test": len(test),
              "n_test_malignant": int(y.sum()), "n_features": len(fusion.spec.features),
              "lightgbm_trees": fusion.n_trees, "lgb_no_offset_trees": plain.n_trees,
              "lightgbm_oof": {k: fusion.metrics[k] for k in ("oof_auc", "oof_pauc80")},
              "hgb_rounds": hgb_rounds, "methods": rows,
              "differences_ci95": {k: v for k, v in intervals.items() if "_minus_" in k}}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
