"""Keras callbacks kmel adds to ``fit``: staged unfreezing, resumable early stopping, TensorBoard extras."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kmel import constants as C


def best_so_far(values: Sequence[float], mode: str) -> tuple[float, int] | None:
    """(best value, its index) of a monitored metric over finished epochs; None if there are none."""
    finite = [(v, i) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
    if not finite:
        return None
    # Ties go to the earliest epoch, as in Keras (only a strict improvement counts).
    if mode == "max":
        return max(finite, key=lambda t: (t[0], -t[1]))
    return min(finite, key=lambda t: (t[0], t[1]))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that, in a run resumed by BackupAndRestore, continues from the finished epochs'
    values (``prior``, from the CSV history) instead of forgetting them: the best value, its epoch
    and the epochs waited since. Plain EarlyStopping restarts its patience on every resume."""

    def __init__(self, *args: Any, prior: Sequence[float] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prior = list(prior)

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        found = best_so_far(self.prior, self.mode)
        if found is not None:
            self.best, self.best_epoch = float(found[0]), int(found[1])
            self.wait = len(self.prior) - 1 - found[1]


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``, those of nested models (``train joint``'s segmenter and classifier) included."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(all_layers(layer))
    return out


def apply_precise_batchnorm(model: keras.Model, batches: Sequence[np.ndarray]) -> int:
    """Reset the moving statistics of every *trainable* BatchNormalization layer to the plain average
    of their batch statistics over ``batches`` (forward passes in training mode; no weight changes).

    "Precise BN": from scratch, a few hundred steps are too few for moving averages to catch up with
    fast-moving weights, and inference-mode outputs can saturate to a constant. Frozen (pretrained)
    BatchNorm layers are left alone. Returns the number of layers recalibrated.
    """
    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
              and layer.trainable]
    if not layers or not len(batches):
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for k, batch in enumerate(batches):
            for layer in layers:
                layer.momentum = k / (k + 1.0)  # running mean of the batch statistics seen so far
            model(batch, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before each validation, recompute trainable BatchNorm statistics on fixed training batches
    (see :func:`apply_precise_batchnorm`); the best-epoch checkpoint then holds those statistics."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        super().__init__()
        self.batches = list(batches)

    def on_test_begin(self, logs: dict | None = None) -> None:
        apply_precise_batchnorm(self.model, self.batches)


def stage_for_epoch(schedule: Sequence[tuple[int, str]], epoch: int) -> str:
    """The unfreezing stage in force at ``epoch`` (the last entry whose start ≤ epoch)."""
    ordered = sorted(schedule, key=lambda s: int(s[0]))
    stage = str(ordered[0][1])
    for start, name in ordered:
        if int(start) <= epoch:
            stage = str(name)
    return stage


class StagedUnfreezing(keras.callbacks.Callback):
    """Switch which layers train at epoch boundaries, within one ``fit`` call.

    The optimizer was built over every weight before the first freeze, so a stage change only
    needs a freshly traced train step; this also makes a resumed run (BackupAndRestore) start in
    the stage of the epoch it resumes at.
    """

    def __init__(self, schedule: Sequence[tuple[int, str]], apply_stage: Callable[[keras.Model, str], None]):
        super().__init__()
        self.schedule = tuple((int(s), str(n)) for s, n in schedule)
        self.apply_stage = apply_stage
        self.current: str | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        stage = stage_for_epoch(self.schedule, epoch)
        if stage != self.current:
            self.apply_stage(self.model, stage)
            if self.current is not None:
                self.model.make_train_function(force=True)
            self.current = stage
            n = sum(int(np.prod(v.shape)) for v in self.model.trainable_weights)
            print(f"epoch {epoch + 1}: unfreezing stage {stage!r} ({n:,} trainable parameters)")


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` to the epoch logs (TensorBoard, CSVLogger pick it up)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


def overlay_grid(images: np.ndarray, masks: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """[N, H, 3W, 3] uint8 rows of image | true mask outline on image | predicted probability."""
    rows = []
    for image, mask, pred in zip(images, masks, preds):
        image = np.clip(image, 0, 255).astype(np.uint8)
        truth = image.copy()
        truth[mask[..., 0] > 0.5] = (0.5 * truth[mask[..., 0] > 0.5] + [0, 127, 0]).astype(np.uint8)
        heat = np.repeat((np.clip(pred, 0, 1) * 255).astype(np.uint8), 3, axis=-1)
        rows.append(np.concatenate([image, truth, heat], axis=1))
    return np.stack(rows)


class SegmentationImages(keras.callbacks.Callback):
    """Writes a few validation overlays (image / true mask / predicted mask) to TensorBoard."""

    def __init__(self, logdir: str, images: np.ndarray, masks: np.ndarray):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.images, self.masks = images, masks

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        preds = self.model.predict(self.images, verbose=0)
        with self.writer.as_default():
            tf.summary.image("val_overlays", overlay_grid(self.images, self.masks, preds), step=epoch, max_outputs=8)
        self.writer.flush()


class GroupRecallLogger(keras.callbacks.Callback):
    """Validation recall per skin-tone group (and, for a diagnosis head, per class), logged to TensorBoard
    each epoch.

    With ``choose`` (``(targets, scores, group names) -> threshold``: the rule that picks the exported
    threshold), recall is taken at the threshold it picks on these validation examples, logged as
    ``val_threshold``: the operating point a user would get had training stopped at that epoch
    (exactly, when the validation set fits in ``images``). Training is resampled towards malignant,
    so 0.5 is not that point; without ``choose`` the tags say ``at_0.5``.
    """

    def __init__(self, logdir: str, images: np.ndarray, targets: np.ndarray, groups: np.ndarray,
                 choose: Callable[[np.ndarray, np.ndarray, np.ndarray], float] | None = None,
                 score: Callable[[np.ndarray], np.ndarray] | None = None,
                 classes: Sequence[str] = (), true_class: np.ndarray | None = None):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.images, self.targets, self.groups = images, targets.reshape(-1), groups.reshape(-1)
        self.choose = choose
        # the model's outputs → one malignant score per image (a diagnosis head sums its malignant classes)
        self.score = score or (lambda outputs: np.asarray(outputs).reshape(-1))
        # a diagnosis head: each class's recall of the arg-max class too, as val_recall_by_class/<CLASS>
        self.classes = tuple(classes)
        self.true_class = None if true_class is None else np.asarray(true_class).reshape(-1).astype(int)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        outputs = self.model.predict(self.images, verbose=0)
        scores = self.score(outputs)
        if self.classes and self.true_class is not None:
            guess = np.asarray(outputs).reshape(len(scores), -1).argmax(axis=1)
            with self.writer.as_default():
                for k, name in enumerate(self.classes):
                    if (self.true_class == k).any():
                        tf.summary.scalar(f"val_recall_by_class/{name}",
                                          float((guess[self.true_class == k] == k).mean()), step=epoch)
        with self.writer.as_default():
            if self.choose is None:
                threshold, prefix = 0.5, "val_recall_by_skin_tone_at_0.5"
            else:
                names = np.asarray(C.SKIN_TONE_GROUPS)[self.groups.astype(int)]
                threshold, prefix = float(self.choose(self.targets, scores, names)), "val_recall_by_skin_tone"
                tf.summary.scalar("val_threshold", threshold, step=epoch)
            for g, name in enumerate(C.SKIN_TONE_GROUPS):
                pos = (self.groups == g) & (self.targets == 1)
                if pos.any():
                    tf.summary.scalar(f"{prefix}/{name}", float((scores[pos] >= threshold).mean()), step=epoch)
        self.writer.flush()


def take_numpy(dataset: tf.data.Dataset, n: int) -> tuple[Any, ...]:
    """The first ``n`` examples of a batched dataset as NumPy arrays."""
    parts: list[list[np.ndarray]] = []
    got = 0
    for batch in dataset:
        arrays = [np.asarray(t) for t in batch]
        parts.append(arrays)
        got += len(arrays[0])
        if got >= n:
            break
    return tuple(np.concatenate([p[i] for p in parts])[:n] for i in range(len(parts[0])))
