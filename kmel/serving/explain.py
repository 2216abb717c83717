"""Grad-CAM explanations from the exported classifier (its ``gradcam`` and ``gradcam_class`` endpoints).

The classifier is one flat functional graph, so the export adds a second endpoint that returns,
for each image, the Grad-CAM map of the last convolution's activations (ReLU of the
gradient-weighted channel sum, scaled to [0, 1], resized to the input size).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np

from kmel import constants as C

if TYPE_CHECKING:
    from kmel.models.heads import ClassifierHead


def make_gradcam_fn(models_dir: str | Path, loaded: Any = None,
                    class_index: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The exported classifier's ``gradcam`` endpoint as a NumPy function (``loaded``: the classifier
    SavedModel when the caller has it already); with ``class_index``, a diagnosis model's ``gradcam_class``
    endpoint for that class (the maps of, say, MEL whatever class each image is predicted to be)."""
    from kmel.models.pipeline import load_serving, signature_fn

    loaded = load_serving(Path(models_dir) / C.CLASSIFIER_DIR) if loaded is None else loaded
    if class_index is None:
        _require(models_dir, loaded, "gradcam")
        return signature_fn(loaded, "gradcam")
    by_class = _gradcam_class(models_dir, loaded)

    def call(batch: np.ndarray) -> np.ndarray:
        return by_class(batch, int(class_index))

    call.loaded = loaded  # type: ignore[attr-defined]  # keeps the SavedModel (its variables) alive with the function
    return call


def make_decision_gradcam_fn(
    models_dir: str | Path, head: ClassifierHead, loaded: Any = None, class_index: int | None = None,
) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """``fn(batch, decided) -> [N, S, S] maps``: Grad-CAM of the class each image is named (``decided``: its class
    indices from :meth:`ClassifierHead.decide`, None for a yes/no model), or of ``class_index`` for every image.

    The ``gradcam`` endpoint's class is an arg-max of the probabilities inside the graph: the named class when
    the head decides by the arg-max (yes/no models; diagnosis models without training draw shares), one call a
    batch. Dividing by the draw shares may name another class, so then ``gradcam_class`` (in every exported
    diagnosis model: nothing to re-export) runs once per class named in the batch."""
    from kmel.models.pipeline import load_serving

    loaded = load_serving(Path(models_dir) / C.CLASSIFIER_DIR) if loaded is None else loaded
    if class_index is not None or not head.multiclass or head.class_draw_share is None:
        one = make_gradcam_fn(models_dir, loaded, class_index)
        return lambda batch, decided=None: one(batch)
    by_class = _gradcam_class(models_dir, loaded)

    def call(batch: np.ndarray, decided: np.ndarray | None) -> np.ndarray:
        decided = np.asarray(decided, dtype=int).reshape(-1)
        maps = np.zeros(batch.shape[:3], np.float32)
        for c in np.unique(decided):
            rows = np.flatnonzero(decided == c)
            maps[rows] = by_class(np.ascontiguousarray(batch[rows]), int(c))
        return maps

    call.loaded = loaded  # type: ignore[attr-defined]
    return call


def _require(models_dir: str | Path, loaded: Any, name: str) -> None:
    if name not in loaded.signatures:
        raise FileNotFoundError(f"{models_dir}/{C.CLASSIFIER_DIR} was exported without a {name} endpoint")


def _gradcam_class(models_dir: str | Path, loaded: Any) -> Callable[[np.ndarray, int], np.ndarray]:
    """A diagnosis model's ``gradcam_class`` endpoint: ``fn(batch, class_index) -> maps``."""
    import tensorflow as tf

    _require(models_dir, loaded, "gradcam_class")
    fn = loaded.signatures["gradcam_class"]

    def call(batch: np.ndarray, class_index: int) -> np.ndarray:
        index = tf.constant(int(class_index), tf.int32)
        return next(iter(fn(images=tf.constant(batch, tf.float32), class_index=index).values())).numpy()

    return call


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image with a JET heat map blended on top."""
    heat_u8 = (np.clip(heat, 0, 1) * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image.astype(np.uint8), 1 - alpha, colour, alpha, 0)


def save_overlay(path: str | Path, image: np.ndarray, heat: np.ndarray) -> Path:
    path = Path(path)
    side = np.concatenate([image.astype(np.uint8), overlay(image, heat)], axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(side, cv2.COLOR_RGB2BGR))
    return path
