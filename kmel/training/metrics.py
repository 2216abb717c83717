"""The classifier's training metrics, for either head (:class:`kmel.models.heads.ClassifierHead`).

A yes/no head logs Keras' AUC, recall and precision. A diagnosis head logs the same three names on its malignant
probability (the sum over the malignant classes against "the true class is malignant"), so ``val_auc`` is the
quantity early stopping and checkpointing watch for both heads, plus ``balanced_accuracy``: the mean per-class
recall of the arg-max class (the ISIC 2018 / 2019 metric) over the classes present.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from kmel.models.heads import ClassifierHead


def _malignant(y_true, y_pred, malignant: Sequence[int]):
    """(0/1 truth [N, 1], malignant probability [N, 1]) from class indices and softmax outputs."""
    k = ops.shape(y_pred)[-1]
    mask = ops.sum(ops.one_hot(ops.convert_to_tensor(list(malignant), "int32"), k), axis=0)  # [K] 0/1
    index = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    truth = ops.take(mask, index)[:, None]
    score = ops.sum(ops.cast(y_pred, "float32") * mask[None, :], axis=-1, keepdims=True)
    return truth, score


def _malignant_metric(base: type) -> type:
    """``base`` (AUC, Recall, Precision) computed on the malignant side of a softmax head."""

    class Malignant(base):
        def __init__(self, malignant: Sequence[int] = (), **kwargs):
            super().__init__(**kwargs)
            self.malignant = [int(i) for i in malignant]

        def update_state(self, y_true, y_pred, sample_weight=None):
            truth, score = _malignant(y_true, y_pred, self.malignant)
            return super().update_state(truth, score, sample_weight)

        def get_config(self):
            return {**super().get_config(), "malignant": self.malignant}

    Malignant.__name__ = Malignant.__qualname__ = f"Malignant{base.__name__}"
    return keras.saving.register_keras_serializable(package="kmel")(Malignant)


MalignantAUC = _malignant_metric(keras.metrics.AUC)
MalignantRecall = _malignant_metric(keras.metrics.Recall)
MalignantPrecision = _malignant_metric(keras.metrics.Precision)


@keras.saving.register_keras_serializable(package="kmel")
class BalancedAccuracy(keras.metrics.Metric):
    """Mean over the classes present in the truths of the recall of the arg-max class (class-index truths)."""

    def __init__(self, n_classes: int = 2, name: str = "balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.confusion = self.add_variable(shape=(self.n_classes, self.n_classes), initializer="zeros",
                                           name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.n_classes)
        guess = ops.one_hot(ops.argmax(y_pred, axis=-1), self.n_classes)
        self.confusion.assign_add(ops.matmul(ops.transpose(truth), guess))

    def result(self):
        per_class = ops.sum(self.confusion, axis=1)
        recall = ops.divide_no_nan(ops.diagonal(self.confusion), per_class)
        present = ops.cast(per_class > 0, "float32")
        return ops.divide_no_nan(ops.sum(recall * present), ops.sum(present))

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.n_classes, self.n_classes)))

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes}


def make_classifier_metrics(head: ClassifierHead) -> list[keras.metrics.Metric]:
    """``auc``, ``recall``, ``precision`` (of the malignant side) and, for a diagnosis head, ``balanced_accuracy``."""
    if not head.multiclass:
        return [keras.metrics.AUC(name="auc"), keras.metrics.Recall(name="recall"),
                keras.metrics.Precision(name="precision")]
    mal = head.malignant_index
    return [MalignantAUC(mal, name="auc"), MalignantRecall(mal, name="recall"),
            MalignantPrecision(mal, name="precision"), BalancedAccuracy(head.n_outputs)]
