"""Calibration: one temperature fitted on validation labels, and the expected calibration error before and
after it, overall and per group. Applying the temperature is :func:`kmel.models.pipeline.apply_temperature`
(what ``predict`` does with pipeline.json's ``temperature``)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kmel.evaluation.fairness import _clean, _ordered
from kmel.models.scores import logit


def expected_calibration_error(y_true: Any, probabilities: Any, n_bins: int = 10) -> float | None:
    """ECE: the bin-size-weighted mean |observed positive fraction − mean probability| over equal-width bins."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return None
    which = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / y.size)


def fit_temperature(y_true: Any, probabilities: Any) -> float:
    """The temperature that minimises the log loss of ``probabilities`` on (validation) labels."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    z = logit(np.asarray(probabilities).reshape(-1))
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        zt = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, zt) - y * zt))

    best = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(best.x))


def fit_class_temperature(classes: Any, probabilities: Any) -> float:
    """The temperature T that minimises the log loss of softmax(log p / T) on (validation) class indices; 1.0
    when fewer than two classes are present."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(classes).reshape(-1).astype(int)
    logp = np.log(np.clip(np.asarray(probabilities, dtype=np.float64).reshape(len(y), -1), 1e-12, 1.0))
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    best = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(best.x))


def calibration_report(
    y_true: Any, raw: Any, calibrated: Any, groups: Mapping[str, Any], temperature: float, n_bins: int = 10,
) -> dict[str, Any]:
    """ECE before and after temperature scaling, overall and per group of each grouping."""
    y = np.asarray(y_true).reshape(-1)
    raw, cal = np.asarray(raw, np.float64).reshape(-1), np.asarray(calibrated, np.float64).reshape(-1)
    out: dict[str, Any] = {"temperature": temperature, "n_bins": n_bins,
                           "overall": {"ece_before": expected_calibration_error(y, raw, n_bins),
                                       "ece_after": expected_calibration_error(y, cal, n_bins), "n": int(y.size)}}
    for grouping, values in groups.items():
        g = np.asarray(values).astype(str).reshape(-1)
        out[grouping] = {str(name): {"ece_before": expected_calibration_error(y[g == name], raw[g == name], n_bins),
                                     "ece_after": expected_calibration_error(y[g == name], cal[g == name], n_bins),
                                     "n": int((g == name).sum())} for name in _ordered(np.unique(g))}
    return _clean(out)
