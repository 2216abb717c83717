"""Decision threshold choice and per-group fairness (fairlearn ``MetricFrame``).

The threshold rule everywhere is ``prediction = score >= threshold``. It must be chosen on the
validation split and reported on the test split: a threshold tuned on the data it is reported on
flatters every number (the reference pipeline did that). Groups are the estimated skin tone and,
where known, the annotated Fitzpatrick type, sex, age band, anatomic site and source archive; a
group named ``unknown`` is shown but left out of gaps, and a gap between groups smaller than
``min_group_size`` is shown but not ranked.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)
from sklearn import metrics as skm

THRESHOLD_METHODS = ("f1_group_floor", "f1", "youden", "sensitivity")
BOOTSTRAP_METRICS = ("accuracy", "recall", "precision", "f1", "auc", "pauc80")
GAP_METRICS = ("accuracy", "recall", "precision", "f1", "specificity", "selection_rate", "auc", "pauc80")
PAUC_MIN_TPR = 0.8  # the ISIC 2024 challenge metric: partial AUC above 80 % true-positive rate
UNKNOWN = "unknown"
MIN_GROUP_SIZE = 30
FITZPATRICK_BANDS = ("I-II", "III-IV", "V-VI")
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75+"))


def _clean(value: Any) -> Any:
    """JSON-safe: NumPy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _curve(y: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    """Confusion counts at every candidate threshold (the unique scores, plus 0.5), vectorised."""
    thresholds = np.unique(np.concatenate([s, [0.5]]))
    order = np.sort(s)
    # predicted positive at t: scores >= t
    n_pos_pred = len(s) - np.searchsorted(order, thresholds, side="left")
    pos_scores = np.sort(s[y == 1])
    neg_scores = np.sort(s[y == 0])
    tp = len(pos_scores) - np.searchsorted(pos_scores, thresholds, side="left")
    fp = len(neg_scores) - np.searchsorted(neg_scores, thresholds, side="left")
    fn = len(pos_scores) - tp
    tn = len(neg_scores) - fp
    return {"t": thresholds, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "pp": n_pos_pred}


def _rates(c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(c["tp"] + c["fn"] > 0, c["tp"] / np.maximum(c["tp"] + c["fn"], 1), 0.0)
        precision = np.where(c["tp"] + c["fp"] > 0, c["tp"] / np.maximum(c["tp"] + c["fp"], 1), 0.0)
        specificity = np.where(c["tn"] + c["fp"] > 0, c["tn"] / np.maximum(c["tn"] + c["fp"], 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"recall": recall, "precision": precision, "specificity": specificity, "f1": f1}


def choose_threshold(
    y_true: Any, scores: Any, method: str = "f1_group_floor", groups: Any = None, min_group_recall: float = 0.7,
    target_sensitivity: float = 0.9,
) -> dict[str, Any]:
    """Pick the decision threshold on validation data.

    ``f1``: maximise F1. ``youden``: maximise TPR − FPR. ``sensitivity``: the highest threshold
    with recall ≥ ``target_sensitivity``. ``f1_group_floor``: maximise F1 among thresholds where
    every group with a positive has recall ≥ ``min_group_recall``; if none does, maximise the
    worst group's recall (ties: best F1) and report ``floor_met: False``.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("cannot choose a threshold on an empty validation set")
    curve = _curve(y, s)
    rates = _rates(curve)
    t = curve["t"]
    worst = np.ones_like(t)
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        for name in np.unique(g):
            sel = g == name
            if (y[sel] == 1).any():
                pos = np.sort(s[sel & (y == 1)])
                recall_g = (len(pos) - np.searchsorted(pos, t, side="left")) / len(pos)
                worst = np.minimum(worst, recall_g)
    floor_met = True
    if method == "f1":
        idx = int(np.argmax(rates["f1"]))
    elif method == "youden":
        idx = int(np.argmax(rates["recall"] - (1 - rates["specificity"])))
    elif method == "sensitivity":
        ok = np.nonzero(rates["recall"] >= target_sensitivity)[0]
        idx = int(ok[-1]) if len(ok) else 0
        floor_met = bool(len(ok))
    else:
        ok = worst >= min_group_recall
        if ok.any():
            idx = int(np.argmax(np.where(ok, rates["f1"], -1.0)))
        else:
            floor_met = False
            best = worst.max()
            idx = int(np.argmax(np.where(worst == best, rates["f1"], -1.0)))
    return _clean({
        "threshold": float(t[idx]), "method": method, "f1": rates["f1"][idx], "recall": rates["recall"][idx],
        "precision": rates["precision"][idx], "specificity": rates["specificity"][idx],
        "worst_group_recall": worst[idx] if groups is not None else None, "floor_met": floor_met,
        "min_group_recall": min_group_recall if method == "f1_group_floor" else None,
        "target_sensitivity": target_sensitivity if method == "sensitivity" else None, "n": int(y.size),
        "n_positive": int(y.sum()),
    })


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(skm.roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


def partial_auc(y_true: Any, scores: Any, min_tpr: float = PAUC_MIN_TPR) -> float:
    """The area under the ROC curve above ``min_tpr`` true-positive rate (the ISIC 2024 challenge's metric at 0.8).

    ∫ max(TPR(f) − min_tpr, 0) df over the false-positive rate f ∈ [0, 1], on the ROC curve with straight lines
    between thresholds (ties make a diagonal step): range 0 to ``1 − min_tpr``; at 0.8 a perfect ranking scores
    0.2, a random one 0.02 and a reversed one 0. Not standardised (unlike scikit-learn's ``max_fpr``). NaN without
    both classes.
    """
    y = np.asarray(y_true).astype(int).reshape(-1)
    if len(np.unique(y)) != 2:
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(y, np.asarray(scores, dtype=np.float64).reshape(-1), drop_intermediate=False)
    width = np.diff(fpr)
    a, b = tpr[:-1] - min_tpr, tpr[1:] - min_tpr  # heights above the floor at each segment's ends
    whole = np.where((a >= 0) & (b >= 0), width * (a + b) / 2, 0.0)
    # A segment crossing the floor: only the triangle above it counts.
    crossing = (a < 0) & (b > 0)
    part = np.where(crossing, width * np.square(np.maximum(b, 0)) / np.where(crossing, b - a, 1.0) / 2, 0.0)
    return float(whole.sum() + part.sum())


def summary_metrics(y_true: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Overall metrics at ``threshold`` (precision is 0 when nothing is predicted positive)."""
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    p = (s >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, p, labels=[0, 1]).ravel()
    two = len(np.unique(y)) == 2
    return _clean({
        "n": int(y.size), "n_positive": int(y.sum()), "threshold": float(threshold),
        "auc": _auc(y, s), "pauc80": partial_auc(y, s),
        "average_precision": float(skm.average_precision_score(y, s)) if two else None,
        "accuracy": float(skm.accuracy_score(y, p)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "precision": float(skm.precision_score(y, p, zero_division=0)),
        "f1": float(skm.f1_score(y, p, zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, p)) if two else None,
        "brier": float(skm.brier_score_loss(y, s)) if y.size else None,
        "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
    })


def _point_metrics(y: np.ndarray, s: np.ndarray, p: np.ndarray) -> dict[str, float]:
    tp = float(((p == 1) & (y == 1)).sum())
    fp = float(((p == 1) & (y == 0)).sum())
    fn = float(((p == 0) & (y == 1)).sum())
    tn = float(((p == 0) & (y == 0)).sum())
    n = max(len(y), 1)
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"accuracy": (tp + tn) / n, "recall": recall, "precision": precision, "f1": f1,
            "specificity": tn / (tn + fp) if tn + fp else float("nan"), "selection_rate": (tp + fp) / n,
            "auc": _auc(y, s), "pauc80": partial_auc(y, s)}


def _bootstrap(y: np.ndarray, s: np.ndarray, p: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict:
    """95% percentile intervals; resampling rows of one group (or of everything) with replacement."""
    return _intervals(_bootstrap_samples(y, s, p, n_boot, rng))


def _intervals(samples: Mapping[str, np.ndarray]) -> dict:
    out = {}
    for name, v in samples.items():
        v = v[~np.isnan(v)]
        out[name] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None
    return out


def _bootstrap_samples(
    y: np.ndarray, s: np.ndarray, p: np.ndarray, n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` resamples (AUC on the first 200); NaN where undefined."""
    if n_boot <= 0 or len(y) == 0:
        return {}
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    yb, pb = y[idx], p[idx]
    tp = ((pb == 1) & (yb == 1)).sum(1).astype(float)
    fp = ((pb == 1) & (yb == 0)).sum(1).astype(float)
    fn = ((pb == 0) & (yb == 1)).sum(1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "accuracy": (pb == yb).mean(1),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }
    auc, pauc = [], []
    for row in idx[: min(n_boot, 200)]:  # AUC needs a sort per resample: 200 are plenty for an interval
        auc.append(_auc(y[row], s[row]))
        pauc.append(partial_auc(y[row], s[row]))
    values["auc"], values["pauc80"] = np.asarray(auc), np.asarray(pauc)
    return values


def _ordered(names: Any) -> list[str]:
    """Group names from lightest to darkest when they are one of kmel's tone scales, else alphabetical."""
    from kmel.constants import ITA_CATEGORIES, SKIN_TONE_GROUPS

    names = [str(n) for n in names]
    for scale in (SKIN_TONE_GROUPS, ITA_CATEGORIES, FITZPATRICK_BANDS, tuple(b[2] for b in AGE_BANDS)):
        if set(names) - {UNKNOWN} <= set(scale):
            return sorted(names, key=lambda n: scale.index(n) if n in scale else len(scale))
    return sorted(names, key=lambda n: (n == UNKNOWN, n))


def age_bands(age: Any) -> np.ndarray:
    """Ages in years as bands (<30, 30-44, 45-59, 60-74, 75+), ``unknown`` where missing."""
    a = np.asarray(age, dtype=np.float64).reshape(-1)
    out = np.full(a.shape, UNKNOWN, dtype=object)
    for lo, hi, name in AGE_BANDS:
        out[(a >= lo) & (a < hi)] = name
    return out.astype(str)


def _gaps(per_group: Mapping[str, Any], samples: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Max–min gap per metric over ``per_group`` (no ``unknown``), with a bootstrap interval of the gap."""
    gaps = {}
    for metric in GAP_METRICS:
        defined = {n: r[metric] for n, r in per_group.items()
                   if n != UNKNOWN and r[metric] is not None and not np.isnan(r[metric])}
        if len(defined) < 2:
            continue
        low, high = min(defined, key=defined.get), max(defined, key=defined.get)
        gap = {"max_minus_min": defined[high] - defined[low],
               "min_over_max": defined[low] / defined[high] if defined[high] > 0 else None,
               "lowest": low, "highest": high}
        draws = [samples[n][metric] for n in defined if metric in samples.get(n, {})]
        if len(draws) == len(defined):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every group is NaN
                stacked = np.vstack(draws)
                spread = np.nanmax(stacked, 0) - np.nanmin(stacked, 0)
            gap["ci95"] = _intervals({"g": spread})["g"]
        gaps[metric] = gap
    return gaps


def fairness_report(
    y_true: Any, scores: Any, threshold: float, groups: Mapping[str, Any], n_bootstrap: int = 1000, seed: int = 0,
    min_group_size: int = MIN_GROUP_SIZE,
) -> dict[str, Any]:
    """Per-group metrics, gaps, equalized-odds and parity differences, bootstrap intervals, per grouping.

    ``gaps`` are over every named group (``unknown`` excluded) and shown; ``ranked_gaps`` only over groups of
    at least ``min_group_size`` images, the ones :func:`rank_gaps` compares across groupings.
    """
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(y) < 2:
        from kmel.data.records import DataError

        raise DataError(f"a fairness report needs at least 2 scored images, got {len(y)}: evaluate a larger split "
                        "(--split val, or records built from more images)")
    p = (s >= threshold).astype(int)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"overall": {**_point_metrics(y, s, p), "ci95": _bootstrap(y, s, p, n_bootstrap, rng)}}
    metric_fns = {
        "accuracy": lambda yt, yp: skm.accuracy_score(yt, yp),
        "recall": lambda yt, yp: skm.recall_score(yt, yp, zero_division=np.nan) if (yt == 1).any() else np.nan,
        "precision": lambda yt, yp: skm.precision_score(yt, yp, zero_division=0),
        "f1": lambda yt, yp: skm.f1_score(yt, yp, zero_division=0),
        "selection_rate": lambda yt, yp: float(np.mean(yp)),
        "n": lambda yt, yp: len(yt),
        "n_positive": lambda yt, yp: int(np.sum(yt)),
    }
    for grouping, values in groups.items():
        g = np.asarray(values).astype(str).reshape(-1)
        frame = MetricFrame(metrics=metric_fns, y_true=y, y_pred=p, sensitive_features=g)
        by_group = frame.by_group
        per_group: dict[str, Any] = {}
        samples: dict[str, dict[str, np.ndarray]] = {}
        for name in _ordered(by_group.index):
            sel = g == name
            row = {k: by_group.loc[name, k] for k in metric_fns}
            row["n"], row["n_positive"] = int(row["n"]), int(row["n_positive"])
            tn = float(((p[sel] == 0) & (y[sel] == 0)).sum())
            fp = float(((p[sel] == 1) & (y[sel] == 0)).sum())
            row["specificity"] = tn / (tn + fp) if tn + fp else float("nan")
            row["auc"], row["pauc80"] = _auc(y[sel], s[sel]), partial_auc(y[sel], s[sel])
            samples[str(name)] = _bootstrap_samples(y[sel], s[sel], p[sel], n_bootstrap, rng)
            row["ci95"] = _intervals(samples[str(name)])
            row["small"] = row["n"] < min_group_size
            per_group[str(name)] = row
        big = {n: r for n, r in per_group.items() if not r["small"]}
        two_classes = len(np.unique(y)) == 2
        out[grouping] = {
            "groups": per_group,
            "gaps": _gaps(per_group, samples),
            "ranked_gaps": _gaps(big, samples),
            "min_group_size": min_group_size,
            "equalized_odds_difference": float(equalized_odds_difference(y, p, sensitive_features=g))
            if two_classes else None,
            "demographic_parity_difference": float(demographic_parity_difference(y, p, sensitive_features=g)),
        }
    return _clean(out)


def rank_gaps(fairness: Mapping[str, Any], metrics: Sequence[str] = ("recall", "accuracy", "auc")) -> list[dict]:
    """Every grouping's ranked gap for ``metrics``, largest first (groups under the minimum size left out)."""
    rows = []
    for grouping, data in fairness.items():
        if grouping == "overall":
            continue
        for metric in metrics:
            gap = data.get("ranked_gaps", {}).get(metric)
            if gap:
                rows.append({"grouping": grouping, "metric": metric, **gap})
    return sorted(rows, key=lambda r: -r["max_minus_min"])


# === Calibration ===


# === Estimated skin tone against the annotation ===


def tone_agreement(annotated: Any, estimated: Any, estimated_scale: Sequence[str]) -> dict[str, Any] | None:
    """How an estimated tone scale agrees with annotated Fitzpatrick bands, on rows where both are known.

    Returns the confusion table (annotation → estimate → count) and Spearman's ρ between the band's rank
    and the estimate's rank on ``estimated_scale`` (lightest first); None when nothing is annotated.
    """
    from scipy.stats import spearmanr

    a = np.asarray(annotated).astype(str).reshape(-1)
    e = np.asarray(estimated).astype(str).reshape(-1)
    known = np.isin(a, FITZPATRICK_BANDS) & np.isin(e, list(estimated_scale))
    if not known.any():
        return None
    a, e = a[known], e[known]
    table = {band: {name: int(((a == band) & (e == name)).sum()) for name in estimated_scale}
             for band in FITZPATRICK_BANDS}
    rank_a = np.array([FITZPATRICK_BANDS.index(v) for v in a])
    rank_e = np.array([list(estimated_scale).index(v) for v in e])
    rho = spearmanr(rank_a, rank_e).statistic if len(np.unique(rank_a)) > 1 and len(np.unique(rank_e)) > 1 else None
    return _clean({"n": int(known.sum()), "spearman_rho": rho, "confusion": table})
