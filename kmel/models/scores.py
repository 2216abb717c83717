"""Probabilities and logits (NumPy only, no TensorFlow): one definition for calibration, serving and fusion."""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before the logit


def logit(p: Any, eps: float = EPS) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [eps, 1 - eps] (float64)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: Any) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow warnings for large |z| (float64)."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))
