"""The :class:`Predictor`: the exported segmenter and classifier with their pipeline settings, loaded once
(``pipeline.json`` is read once): RGB images in, :class:`Prediction` records out. Each image goes through
the same :class:`kmel.lesion.crops.CropPipeline` as the training crops (segment → crop → hair removal →
skin tone), then the classifier. It knows nothing of files, so ``evaluate``, the file runner
(:mod:`kmel.serving.runner`) or a web service can reuse it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kmel import constants as C
from kmel.config import ConfigError
from kmel.data.images import flip_views
from kmel.lesion.crops import CropPipeline
from kmel.models.heads import head_from_entry
from kmel.models.integrity import DEFAULT_CHECKS, ModelChecks
from kmel.models.pipeline import calibrate_outputs, read_pipeline, source_threshold
from kmel.serving.runtime import config_from_pipeline, load_runtime_models


@dataclass(frozen=True)
class Prediction:
    """What the models say about one image; boxes are in the image's own pixels."""

    probability: float
    prediction: int
    label: str
    threshold: float
    skin_tone_group: str
    ita: float
    ita_category: str
    crop_mode: str
    box: tuple[int, int, int, int]
    tta: bool
    crop: np.ndarray = field(repr=False)  # the classifier's input, RGB uint8
    heatmap: np.ndarray | None = field(default=None, repr=False)  # Grad-CAM in [0, 1] when explaining
    # A diagnosis model's calibrated class probabilities (summing to 1; ``probability`` is the malignant ones' sum)
    classes: dict[str, float] | None = None
    # ... and the class it names (ClassifierHead.decide: the arg-max of p_c / q_c when the training draw shares
    # q are known, not necessarily the most probable class); None for a yes/no model
    diagnosis: str | None = None

    def columns(self) -> dict[str, Any]:
        """The model's columns of an output row: a diagnosis model's ``p_<CLASS>`` and ``diagnosis`` first."""
        x0, y0, x1, y1 = self.box
        per_class = {} if self.classes is None else {
            **{f"p_{name}": round(p, 6) for name, p in self.classes.items()}, "diagnosis": self.diagnosis}
        return {
            **per_class,
            "probability": round(self.probability, 6), "prediction": self.prediction, "label": self.label,
            "threshold": self.threshold, "skin_tone_group": self.skin_tone_group, "ita": round(self.ita, 2),
            "ita_category": self.ita_category, "crop_mode": self.crop_mode,
            "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1, "tta": self.tta,
        }


def flip_averaged(classify: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``classify`` (a batch of crops → [N, K] outputs) averaged over the four :func:`flip_views`. ``plain``: the
    outputs of the batch as is, when the caller has them already (a joint model's call gave them with its mask)."""

    def averaged(batch: np.ndarray, plain: np.ndarray | None = None) -> np.ndarray:
        views = flip_views(batch)
        outputs = [classify(np.ascontiguousarray(v)) for v in views[1 if plain is not None else 0:]]
        if plain is not None:
            outputs.insert(0, plain)
        return np.mean([np.asarray(o).reshape(len(batch), -1) for o in outputs], axis=0)

    return averaged


@dataclass(frozen=True)
class JointInput:
    """One image ready for a joint model (``train joint``): no crop, the whole image padded square."""

    small: np.ndarray  # RGB uint8, long side = records.image_size (the skin tone is estimated on it)
    image: np.ndarray  # ``small`` padded square and resized to the model's input side: what the model sees
    pad: tuple[int, int, int, int]  # top, bottom, left, right, in ``small``'s pixels
    original_size: tuple[int, int]  # (height, width) of the image as given


class JointInputs:
    """The crop stage's stand-in for a joint model: :meth:`pre` / :meth:`finish` / :meth:`run` as
    :class:`kmel.lesion.crops.CropPipeline` has them, giving :class:`JointInput` (the image as the joint training
    records hold it: reduced to the records' size, padded square, resized with area averaging)."""

    def __init__(self, size: int, config: Any, workers: int = 0):
        import os

        self.size, self.config = size, config
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)

    def pre(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> JointInput:
        import cv2

        from kmel.data.images import pad_to_square, resize_long_side

        small = resize_long_side(image, self.config.records.image_size)
        square, pad = pad_to_square(small)
        size = original_size if original_size is not None else image.shape[:2]
        return JointInput(small, cv2.resize(square, (self.size, self.size), interpolation=cv2.INTER_AREA), pad,
                          (int(size[0]), int(size[1])))

    def finish(self, pres: Sequence[JointInput]) -> list[JointInput]:
        return list(pres)

    def run(self, images: Sequence[np.ndarray]) -> list[JointInput]:
        return [self.pre(image) for image in images]

    def close(self) -> None:
        pass


def unpad_mask(mask: np.ndarray, item: JointInput) -> np.ndarray:
    """A joint model's [S, S] mask back on ``item.small``'s pixels (the padding cut off), as probabilities."""
    import cv2

    h, w = item.small.shape[:2]
    top, bottom, left, right = item.pad
    side = h + top + bottom
    square = cv2.resize(mask.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return square[top : top + h, left : left + w]


class Predictor:
    """The exported segmenter and classifier with their pipeline settings, loaded once.

    ``predict(images)`` takes RGB uint8 images of any size and returns one :class:`Prediction` each;
    it is :meth:`prepare` (segment → crop → hair removal → skin tone) then :meth:`classify`, which a
    caller may also run apart, in two threads, to overlap them. ``runtime``: ``tf`` (SavedModels) or
    ``tflite`` (``tflite_precision`` files from ``kmel export --format tflite``). Use it as a context
    manager (or call :meth:`close`) to stop its worker threads. ``checks``: what is verified before the
    models load (:mod:`kmel.models.integrity`).
    """

    def __init__(self, models_dir: str | Path = "saved_models", tta: bool = False, explain: bool = False,
                 workers: int | None = None, runtime: str = "tf", tflite_precision: str = "float32",
                 max_batch_pixels: int | None = None, checks: ModelChecks = DEFAULT_CHECKS,
                 pipeline: dict[str, Any] | None = None, explain_class: str | None = None,
                 source: str | None = None):
        self.models_dir = Path(models_dir)
        # the one read of pipeline.json (``pipeline``: its contents, when the caller has read it)
        self.pipeline = read_pipeline(self.models_dir) if pipeline is None else pipeline
        self.config = config_from_pipeline(self.pipeline, self.models_dir)
        classifier = self.pipeline["classifier"]
        # ``source``: the images come from this archive or clinic; its own validation threshold decides
        self.threshold = source_threshold(classifier, source)
        self.source = source
        self.temperature = float(classifier.get("temperature", 1.0))  # the threshold is on the calibrated scale
        self.head = head_from_entry(classifier)
        # the label of each side of the threshold (a diagnosis model's decision is malignant or not)
        self.decision_names = (["benign", "malignant"] if self.head.multiclass
                               else list(classifier.get("class_names", self.head.class_names)))
        self.tta = tta
        # train joint's model: segmenter and classifier in one graph, the whole image in, no crop stage
        self.joint = classifier.get("kind") == "joint"
        if explain and self.joint:
            raise ConfigError("--explain (Grad-CAM) is not built for joint models (kmel train joint): its mask, in the "
                              "mask column's place, shows where it looked; drop --explain")
        if explain and runtime != "tf":
            raise ConfigError("--explain (Grad-CAM) needs the SavedModel runtime: drop --runtime tflite")
        self.models = load_runtime_models(self.models_dir, self.pipeline, runtime, tflite_precision, max_batch_pixels,
                                          checks=checks)
        self._classify = flip_averaged(self.models.classify) if tta else self.models.classify
        self._explain = None
        if explain:  # the maps of the class each image is named (or of ``explain_class`` for every image)
            from kmel.serving.explain import make_decision_gradcam_fn

            self._explain = make_decision_gradcam_fn(
                self.models_dir, self.head, self.models.classifier_savedmodel,
                None if explain_class is None else self.head.class_index(explain_class))
        workers = self.config.predict.workers if workers is None else workers
        self.crops: Any = (JointInputs(self.models.cls_size, self.config, workers) if self.joint else
                           CropPipeline(self.models.segment, self.models.seg_size, self.config, workers))

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Calibrated malignant probabilities of float32 crops (flip-averaged with ``tta``)."""
        return self.calibrated(crops)[1]

    def calibrated(self, crops: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(calibrated [N, K] class probabilities of a diagnosis head, else None; calibrated [N] malignant
        probabilities) of float32 crops, flip-averaged with ``tta``."""
        return calibrate_outputs(self.head, self._classify(crops), self.temperature)

    def prepare(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Segment, crop, remove hair, estimate skin tone: one :class:`kmel.lesion.crops.PreparedCrop` each."""
        return self.crops.run(list(images))

    def classify(self, prepared: Sequence[Any]) -> list[Prediction]:
        """One prediction per prepared crop, in order."""
        if not len(prepared):
            return []
        if self.joint:
            return self._classify_joint(prepared)
        batch = np.stack([p.result.crop for p in prepared]).astype(np.float32)
        classes, probs = self.calibrated(batch)
        decided = None if classes is None else self.head.decide(classes)
        heat = self._explain(batch, decided) if self._explain is not None else [None] * len(prepared)
        out = []
        for i, (prep, prob, cam) in enumerate(zip(prepared, probs, heat)):
            pred = int(prob >= self.threshold)
            tone = prep.result.skin_tone
            out.append(Prediction(
                probability=float(prob), prediction=pred, label=self.decision_names[pred], threshold=self.threshold,
                classes=None if classes is None else dict(zip(self.head.classes, map(float, classes[i]))),
                diagnosis=None if decided is None else self.head.classes[decided[i]],
                skin_tone_group=tone.group_name, ita=float(tone.ita), ita_category=tone.ita_category_name,
                crop_mode=prep.result.crop_mode, box=tuple(int(v) for v in prep.box), tta=self.tta,
                crop=prep.result.crop, heatmap=cam,
            ))
        return out

    def _classify_joint(self, prepared: Sequence[JointInput]) -> list[Prediction]:
        """A joint model's predictions: probability and mask in one call; the skin tone from the skin outside its
        mask (as build-records estimates it outside the expert mask); the box is the whole image."""
        from kmel.lesion.lesion import estimate_skin_tone

        batch = np.stack([p.image for p in prepared]).astype(np.float32)
        raw, masks = self.models.joint(batch)
        if self.tta:  # the three flipped views added to the plain one
            raw = self._classify(batch, plain=raw)
        _, probs = calibrate_outputs(self.head, raw, self.temperature)
        out = []
        for item, prob, mask in zip(prepared, probs, masks):
            pred = int(prob >= self.threshold)
            tone = estimate_skin_tone(item.small, unpad_mask(mask, item) >= 0.5, self.config.crops)
            height, width = item.original_size
            out.append(Prediction(
                probability=float(prob), prediction=pred, label=self.decision_names[pred], threshold=self.threshold,
                skin_tone_group=tone.group_name, ita=float(tone.ita), ita_category=tone.ita_category_name,
                crop_mode=C.JOINT_CROP_MODE, box=(0, 0, width, height), tta=self.tta, crop=item.image,
            ))
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """One prediction per image, in order (an empty list for no images)."""
        if not len(images):
            return []
        return self.classify(self.prepare(images))

    def close(self) -> None:
        self.crops.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
