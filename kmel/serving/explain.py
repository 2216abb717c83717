"""Grad-CAM explanations from the exported classifier (its ``gradcam`` endpoint).

The classifier is one flat functional graph, so the export adds a second endpoint that returns,
for each image, the Grad-CAM map of the last convolution's activations (ReLU of the
gradient-weighted channel sum, scaled to [0, 1], resized to the input size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from kmel import constants as C


def make_gradcam_fn(models_dir: str | Path, loaded: Any = None,
                    class_index: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The exported classifier's ``gradcam`` endpoint as a NumPy function (``loaded``: the classifier
    SavedModel when the caller has it already); with ``class_index``, a diagnosis model's ``gradcam_class``
    endpoint for that class (the maps of, say, MEL whatever class each image is predicted to be)."""
    from kmel.models.pipeline import load_serving, signature_fn

    loaded = load_serving(Path(models_dir) / C.CLASSIFIER_DIR) if loaded is None else loaded
    name = "gradcam" if class_index is None else "gradcam_class"
    if name not in loaded.signatures:
        raise FileNotFoundError(f"{models_dir}/{C.CLASSIFIER_DIR} was exported without a {name} endpoint")
    if class_index is None:
        return signature_fn(loaded, name)
    import tensorflow as tf

    fn, index = loaded.signatures[name], tf.constant(int(class_index), tf.int32)

    def call(batch: np.ndarray) -> np.ndarray:
        return next(iter(fn(images=tf.constant(batch, tf.float32), class_index=index).values())).numpy()

    call.loaded = loaded  # type: ignore[attr-defined]  # keeps the SavedModel (its variables) alive with the function
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
