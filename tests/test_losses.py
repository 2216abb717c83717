"""Loss, metric and schedule values against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kmel.training.losses import (
    DiceCoefficient,
    IoUScore,
    ThresholdedJaccard,
    TverskyLoss,
)
from kmel.training.schedules import OneCycleSchedule


def test_tversky_by_hand():
    y_true = np.array([[1, 1, 0, 0]], "float32").reshape(1, 2, 2, 1)
    y_pred = np.array([[0.9, 0.4, 0.2, 0.0]], "float32").reshape(1, 2, 2, 1)
    # TP = 0.9 + 0.4 = 1.3, FP = 0.2, FN = 0.1 + 0.6 = 0.7; TI = 2.3 / (1.3 + 0.06 + 0.49 + 1) = 2.3 / 2.85
    loss = float(TverskyLoss(alpha=0.3, beta=0.7, smooth=1.0)(y_true, y_pred))
    assert loss == pytest.approx(1 - 2.3 / 2.85, rel=1e-5)


def test_tversky_weights_false_negatives_more():
    y_true = np.ones((1, 4, 4, 1), "float32")
    y_true[0, :2] = 0
    missed = y_true * 0.0  # every lesion pixel missed
    over = np.ones_like(y_true)  # every background pixel claimed
    loss = TverskyLoss(alpha=0.3, beta=0.7, smooth=0.0)
    assert float(loss(y_true, missed)) > float(loss(y_true, over))
    dice_like = TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0)
    p = np.clip(y_true + 0.25, 0, 1)
    tp, fp = 8.0, 8 * 0.25
    assert float(dice_like(y_true, p)) == pytest.approx(1 - 2 * tp / (2 * tp + fp), rel=1e-5)


def _masks():
    true = np.zeros((3, 4, 4, 1), "float32")
    pred = np.zeros((3, 4, 4, 1), "float32")
    true[0, 0, :4] = 1  # 4 pixels
    pred[0, 0, 1:4] = 0.9  # 3 of them
    pred[0, 1, 0] = 0.7  # and one false positive -> J = 3/5, Dice = 6/8
    true[1, 2, 2:4] = 1
    pred[1, 2, 2:4] = 0.6  # identical -> 1, 1
    pred[1, 3, 3] = 0.4  # below the 0.5 threshold: ignored
    # image 2: both empty -> 1, 1
    return true, pred


@pytest.mark.parametrize(
    "metric, expected",
    [(DiceCoefficient(), (0.75 + 1 + 1) / 3), (IoUScore(), (0.6 + 1 + 1) / 3),
     (ThresholdedJaccard(), (0 + 1 + 1) / 3)],
)
def test_per_image_metrics_by_hand(metric, expected):
    true, pred = _masks()
    metric.update_state(true[:2], pred[:2])
    metric.update_state(true[2:], pred[2:])  # accumulates over batches per image, not per pixel
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_thresholded_jaccard_keeps_scores_above_floor():
    true = np.zeros((1, 4, 4, 1), "float32")
    true[0, :2] = 1  # 8 pixels
    pred = true.copy()
    pred[0, 1, 3] = 0  # 7 of 8 -> J = 0.875 (kept)
    metric = ThresholdedJaccard()
    metric.update_state(true, pred)
    assert float(metric.result()) == pytest.approx(0.875)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0)])
def test_focal_loss_is_class_balanced_as_documented(alpha, gamma):
    """The loss ``fit_classifier`` compiles (``make_classifier_loss``): −α_t (1 − p_t)^γ log p_t, α_t = α for
    positives, 1 − α for negatives, with the profile's α and γ."""
    from kmel.config import load_config
    from kmel.training.losses import make_classifier_loss

    cc = load_config("cpu-small", {"classifier.focal_alpha": alpha, "classifier.focal_gamma": gamma}).classifier
    loss = make_classifier_loss(cc)
    y_true = np.array([[1.0], [0.0]], "float32")
    y_pred = np.array([[0.8], [0.3]], "float32")
    positive = -alpha * 0.2**gamma * math.log(0.8)
    negative = -(1 - alpha) * 0.3**gamma * math.log(0.7)
    assert float(loss(y_true, y_pred)) == pytest.approx((positive + negative) / 2, rel=1e-4)


def test_one_cycle_values():
    s = OneCycleSchedule(max_lr=1e-3, total_steps=100, warmup_fraction=0.3, div_factor=25, final_div_factor=1e4)
    start, end = 1e-3 / 25, 1e-3 / 25 / 1e4
    assert float(s(0)) == pytest.approx(start, rel=1e-5)
    assert float(s(15)) == pytest.approx(start + (1e-3 - start) / 2, rel=1e-5)  # half-way up the cosine
    assert float(s(30)) == pytest.approx(1e-3, rel=1e-5)
    assert float(s(65)) == pytest.approx(end + (1e-3 - end) / 2, rel=1e-5)  # half-way down
    assert float(s(100)) == pytest.approx(end, rel=1e-3)
    assert float(s(500)) == pytest.approx(end, rel=1e-3)
    values = [float(s(i)) for i in range(101)]
    assert max(values) == pytest.approx(1e-3) and values.index(max(values)) == 30
    again = OneCycleSchedule.from_config(s.get_config())
    assert float(again(42)) == float(s(42))

