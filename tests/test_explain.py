"""Grad-CAM: a hand-built classifier whose only evidence is the lesion must light up the lesion."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from kmel import constants as C
from kmel.models.gradcam import make_gradcam_graph_fn
from kmel.serving.explain import make_gradcam_fn, overlay, save_overlay
from kmel.serving.export import export_serving

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


def _gradcam_by_hand(model: keras.Model, images: np.ndarray, layer: str) -> np.ndarray:
    """Grad-CAM from its definition (Selvaraju et al.), with a GradientTape on the Keras model itself."""
    import tensorflow as tf

    inputs = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        activations = {}
        x = inputs
        for lay in model.layers[1:]:  # a plain chain: keep the conv layer's output on the tape
            x = lay(x, training=False)
            activations[lay.name] = x
        score = tf.reduce_sum(x)
    conv = activations[layer]
    grads = tape.gradient(score, conv).numpy()
    conv = conv.numpy()
    alpha = grads.mean(axis=(1, 2))  # one weight per channel and image
    cam = np.maximum((conv * alpha[:, None, None, :]).sum(-1), 0)
    return cam / cam.max(axis=(1, 2), keepdims=True)  # the conv keeps the input size: no resize


def test_exported_gradcam_endpoint_matches_gradcam_by_hand(tmp_path):
    """The SavedModel's ``gradcam`` endpoint against an independent computation, on channels that
    disagree (mixed-sign weights), so the ReLU and the channel weighting both matter."""
    model = _darkness_classifier()
    rng = np.random.default_rng(0)
    # Channel 0 "dark" counts for the lesion, channel 1 "bright" against it: the skin's CAM is
    # negative before the ReLU. Channels 2 and 3 are noise with small weights.
    kernel = rng.normal(0, 0.01, (3, 3, 3, 4)).astype(np.float32)
    kernel[..., 0], kernel[..., 1] = -1.0 / 27, 1.0 / 27
    model.get_layer("last_conv").set_weights([kernel, np.array([1.0, 0.0, 0.3, 0.3], np.float32)])
    model.get_layer("dense").set_weights([np.array([[2.0], [-1.5], [0.3], [-0.2]], np.float32),
                                          np.array([0.0], np.float32)])
    export_serving(model, tmp_path / C.CLASSIFIER_DIR, SIZE, gradcam_layer="last_conv")
    batch = np.stack([_lesion_image(s)[0] for s in range(3)])
    exported = make_gradcam_fn(tmp_path)(batch)
    by_hand = _gradcam_by_hand(model, batch, "last_conv")
    assert exported.shape == by_hand.shape == (3, SIZE, SIZE)
    assert (by_hand == 0).mean() > 0.05 and (by_hand > 0).mean() > 0.05  # the ReLU cuts somewhere
    np.testing.assert_allclose(exported, by_hand, atol=1e-4)


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
