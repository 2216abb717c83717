"""Segmentation loss and metrics (per image, then averaged), registered for ``.keras`` round trips.

The classifier's loss is Keras' own ``BinaryFocalCrossentropy(apply_class_balancing=True)``:
−α_t (1 − p_t)^γ log p_t with α_t = α for positives and 1 − α for negatives (checked in the tests); the
diagnosis task's softmax head takes :class:`SparseFocalCrossentropy`, −(1 − p_t)^γ log p_t over its classes.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def make_classifier_loss(cc: Any, n_outputs: int = 1) -> keras.losses.Loss:
    """The loss ``fit_classifier`` compiles: class-balanced focal loss with the profile's α, γ and label
    smoothing (``cc``: a :class:`kmel.config.ClassifierConfig`); for a softmax over ``n_outputs`` > 1 classes,
    the focal loss with γ and label smoothing, unweighted (the diagnosis task balances its classes by sampling,
    ``classifier.class_balance``)."""
    if n_outputs > 1:
        return SparseFocalCrossentropy(gamma=cc.focal_gamma, label_smoothing=cc.label_smoothing)
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=cc.focal_alpha, gamma=cc.focal_gamma,
                                                label_smoothing=cc.label_smoothing)


@keras.saving.register_keras_serializable(package="kmel")
class SparseFocalCrossentropy(keras.losses.Loss):
    """−Σ_k q_k (1 − p_k)^γ log p_k over softmax probabilities ``p``, with q the one-hot of the class index
    (``y_true`` [N] or [N, 1]) smoothed by ``label_smoothing``; γ = 0 is the cross-entropy."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0, name: str = "sparse_focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma, self.label_smoothing = float(gamma), float(label_smoothing)

    def call(self, y_true, y_pred):
        p = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
        k = ops.shape(p)[-1]
        q = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), k)
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / ops.cast(k, "float32")
        return -ops.sum(q * ops.power(1.0 - p, self.gamma) * ops.log(p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "label_smoothing": self.label_smoothing}


def _flat(y_true, y_pred):
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    n = ops.shape(y_pred)[0]
    return ops.reshape(y_true, (n, -1)), ops.reshape(y_pred, (n, -1))


@keras.saving.register_keras_serializable(package="kmel")
class TverskyLoss(keras.losses.Loss):
    """1 − Tversky index per image: TI = (TP + s) / (TP + α·FP + β·FN + s).

    ``alpha`` weights false positives, ``beta`` false negatives; β > α makes missed lesion pixels
    cost more than over-segmented ones (α = β = 0.5 is Dice).
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0, name: str = "tversky", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def call(self, y_true, y_pred):
        t, p = _flat(y_true, y_pred)
        tp = ops.sum(t * p, axis=1)
        fp = ops.sum((1 - t) * p, axis=1)
        fn = ops.sum(t * (1 - p), axis=1)
        return 1.0 - (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kmel")
class MaskedTverskyLoss(TverskyLoss):
    """:class:`TverskyLoss` of the images that have a mask; an image whose ``y_true`` is negative (−1 everywhere:
    no expert mask, ``kmel.data.datasets.make_joint_dataset``) adds 0. The mean is over the whole batch, so the term's
    weight grows with the share of images that have masks."""

    def call(self, y_true, y_pred):
        t = ops.reshape(ops.cast(y_true, "float32"), (ops.shape(y_true)[0], -1))
        known = ops.cast(ops.min(t, axis=1) >= 0.0, "float32")
        return super().call(ops.maximum(y_true, 0.0), y_pred) * known


class _PerImageMean(keras.metrics.Metric):
    """Mean over images of a per-image score on thresholded masks."""

    def __init__(self, threshold: float = 0.5, name: str = "score", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def score(self, inter, size_true, size_pred):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        t, p = _flat(y_true, y_pred)
        t = ops.cast(t > 0.5, "float32")
        p = ops.cast(p >= self.threshold, "float32")
        inter = ops.sum(t * p, axis=1)
        scores = self.score(inter, ops.sum(t, axis=1), ops.sum(p, axis=1))
        self.total.assign_add(ops.sum(scores))
        self.count.assign_add(ops.cast(ops.shape(scores)[0], "float32"))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


def _jaccard(inter, size_true, size_pred):
    union = size_true + size_pred - inter
    return ops.where(union > 0, inter / ops.maximum(union, 1.0), 1.0)  # both empty: perfect


@keras.saving.register_keras_serializable(package="kmel")
class DiceCoefficient(_PerImageMean):
    """2|A∩B| / (|A| + |B|) per image; 1 when both masks are empty."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(threshold, name=name, **kwargs)

    def score(self, inter, size_true, size_pred):
        total = size_true + size_pred
        return ops.where(total > 0, 2 * inter / ops.maximum(total, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="kmel")
class IoUScore(_PerImageMean):
    """Jaccard index |A∩B| / |A∪B| per image; 1 when both masks are empty."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", **kwargs):
        super().__init__(threshold, name=name, **kwargs)

    def score(self, inter, size_true, size_pred):
        return _jaccard(inter, size_true, size_pred)


@keras.saving.register_keras_serializable(package="kmel")
class ThresholdedJaccard(_PerImageMean):
    """The ISIC 2018 Task 1 metric: per-image Jaccard, counted as 0 below ``floor`` (0.65)."""

    def __init__(self, threshold: float = 0.5, floor: float = 0.65, name: str = "thresholded_jaccard", **kwargs):
        super().__init__(threshold, name=name, **kwargs)
        self.floor = float(floor)

    def score(self, inter, size_true, size_pred):
        j = _jaccard(inter, size_true, size_pred)
        return ops.where(j >= self.floor, j, 0.0)

    def get_config(self):
        return {**super().get_config(), "floor": self.floor}
