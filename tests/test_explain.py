"""Grad-CAM: a hand-built classifier whose only evidence is the lesion must light up the lesion."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from kmel.explain import make_gradcam_fn, make_gradcam_graph_fn, overlay, save_overlay
from kmel.export import export_serving
from kmel import constants as C

SIZE = 48


def _darkness_classifier() -> keras.Model:
    """Last conv = "how dark is this neighbourhood" (1 − brightness), so the score grows with lesion area."""
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1, name="dense")(x)
    outputs = keras.layers.Activation("sigmoid", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.full((3, 3, 3, 4), -1.0 / 27, np.float32)
    model.get_layer("last_conv").set_weights([kernel, np.ones(4, np.float32)])
    model.get_layer("dense").set_weights([np.full((4, 1), 2.0, np.float32), np.array([-1.0], np.float32)])
    return model


def _lesion_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(215, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.float32)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    centre = tuple(int(v) for v in rng.integers(14, SIZE - 14, 2))
    cv2.circle(mask, centre, int(rng.integers(6, 11)), 1, -1)
    image[mask > 0] = rng.normal(45, 6, (int(mask.sum()), 3))
    return image, mask


def test_gradcam_weight_sits_on_the_lesion():
    model = _darkness_classifier()
    images, masks = zip(*(_lesion_image(s) for s in range(4)))
    batch = np.stack(images)
    heat = make_gradcam_graph_fn(model, "last_conv")(batch).numpy()
    assert heat.shape == (4, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1.0 + 1e-6
    for h, m in zip(heat, masks):
        inside, outside = h[m > 0].mean(), h[m == 0].mean()
        assert inside > 3 * outside, (inside, outside)


def test_exported_gradcam_endpoint_matches_the_graph_function(tmp_path):
    model = _darkness_classifier()
    export_serving(model, tmp_path / C.CLASSIFIER_DIR, SIZE, gradcam_layer="last_conv")
    batch = np.stack([_lesion_image(s)[0] for s in range(2)])
    exported = make_gradcam_fn(tmp_path)(batch)
    direct = make_gradcam_graph_fn(model, "last_conv")(batch).numpy()
    np.testing.assert_allclose(exported, direct, atol=1e-5)


def test_export_without_gradcam_is_a_clear_error(tmp_path):
    export_serving(_darkness_classifier(), tmp_path / C.CLASSIFIER_DIR, SIZE)
    with pytest.raises(FileNotFoundError, match="without a gradcam endpoint"):
        make_gradcam_fn(tmp_path)


def test_overlay_png(tmp_path):
    image, mask = _lesion_image(0)
    blended = overlay(image.astype(np.uint8), mask.astype(np.float32))
    assert blended.shape == (SIZE, SIZE, 3) and blended.dtype == np.uint8
    path = save_overlay(tmp_path / "x.png", image, mask.astype(np.float32))
    assert cv2.imread(str(path)).shape == (SIZE, 2 * SIZE, 3)
