"""Training-time augmentation inside tf.data: TensorFlow / Keras ops only (graph side).

Applied to whole batches after ``batch()``. Geometric transforms use Keras 3 layers, which move
``{"images", "segmentation_masks"}`` together and keep masks binary; photometric ones touch the
image only. Synthetic hair and local contrast are kmel's own ops, driven by stateless random
numbers seeded from ``(seed, batch index)`` so a run is reproducible.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

VALUE_RANGE = (0.0, 255.0)


def apply_random_hair(
    images: tf.Tensor, seed: tf.Tensor, probability: float = 0.3, max_hairs: int = 8
) -> tf.Tensor:
    """Draw dark hair-like quadratic Bézier curves on a random subset of the batch.

    Curve points are scattered into a mask (cheap, O(points)), thickened by a 3×3 max-pool and
    softened by a 3×3 mean, then blended towards a dark brown.
    """
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    n_points = 2 * tf.maximum(h, w)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    has_hair = tf.random.stateless_uniform([b], seeds[0]) < probability
    hair_on = tf.random.stateless_uniform([b, max_hairs], seeds[1]) < 0.6
    hair_on = tf.logical_and(hair_on, has_hair[:, None])
    ctrl = tf.random.stateless_uniform([b, max_hairs, 3, 2], seeds[2])  # 3 control points (y, x) in [0, 1)
    t = tf.linspace(0.0, 1.0, n_points)[None, None, :, None]
    p0, p1, p2 = ctrl[:, :, 0:1, :], ctrl[:, :, 1:2, :], ctrl[:, :, 2:3, :]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [b, hairs, points, 2]
    scale = tf.cast(tf.stack([h - 1, w - 1]), tf.float32)
    pix = tf.cast(tf.round(pts * scale), tf.int32)
    batch_idx = tf.broadcast_to(tf.range(b)[:, None, None, None], [b, max_hairs, n_points, 1])
    idx = tf.concat([batch_idx, pix], axis=-1)
    on = tf.broadcast_to(tf.cast(hair_on, tf.float32)[:, :, None], [b, max_hairs, n_points])
    mask = tf.tensor_scatter_nd_max(tf.zeros([b, h, w], tf.float32), tf.reshape(idx, [-1, 3]), tf.reshape(on, [-1]))
    mask = tf.nn.max_pool2d(mask[..., None], 3, 1, "SAME")
    mask = tf.nn.avg_pool2d(mask, 3, 1, "SAME")
    colour = tf.random.stateless_uniform([b, 1, 1, 1], seeds[3], 15.0, 60.0)
    tint = tf.constant([1.0, 0.8, 0.65])[None, None, None, :]
    return images * (1.0 - mask) + mask * colour * tint


def apply_local_contrast(images: tf.Tensor, seed: tf.Tensor, probability: float = 0.3) -> tf.Tensor:
    """CLAHE-like local contrast: amplify detail around a coarse local mean (per image gain 1–1.6)."""
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    coarse = tf.image.resize(images, tf.maximum(tf.stack([h, w]) // 16, 1), method="area")
    local_mean = tf.image.resize(coarse, tf.stack([h, w]), method="bilinear")
    gain = tf.random.stateless_uniform([b, 1, 1, 1], seeds[0], 1.0, 1.6)
    apply = tf.cast(tf.random.stateless_uniform([b, 1, 1, 1], seeds[1]) < probability, tf.float32)
    gain = 1.0 + apply * (gain - 1.0)
    return tf.clip_by_value(local_mean + (images - local_mean) * gain, *VALUE_RANGE)


def apply_gaussian_noise(images: tf.Tensor, seed: tf.Tensor, max_std: float = 8.0) -> tf.Tensor:
    b = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    std = tf.random.stateless_uniform([b, 1, 1, 1], seeds[0], 0.0, max_std)
    noise = tf.random.stateless_normal(tf.shape(images), seeds[1]) * std
    return tf.clip_by_value(images + noise, *VALUE_RANGE)


def _geometric_layers(seed: int) -> list[keras.layers.Layer]:
    return [
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
        keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomZoom((-0.15, 0.15), fill_mode="reflect", seed=seed + 2),
        keras.layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", seed=seed + 3),
        keras.layers.RandomShear(0.08, 0.08, fill_mode="reflect", seed=seed + 4),
    ]


def _photometric_layers(seed: int, strong: bool) -> list[keras.layers.Layer]:
    layers = [
        keras.layers.RandomColorJitter(
            value_range=VALUE_RANGE,
            brightness_factor=0.15,
            contrast_factor=0.2,
            saturation_factor=(0.35, 0.65) if strong else (0.45, 0.55),
            hue_factor=0.03 if strong else 0.0,
            seed=seed + 10,
        ),
        keras.layers.RandomGaussianBlur(factor=0.5, sigma=(0.1, 1.2), value_range=VALUE_RANGE, seed=seed + 11),
    ]
    return layers


def make_seg_augmenter(seed: int = 0) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """``fn(images, masks, batch_index) -> (images, masks)`` for segmentation batches."""
    geometric = _geometric_layers(seed)
    photometric = _photometric_layers(seed, strong=False)

    def augment(images: tf.Tensor, masks: tf.Tensor, batch_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        data = {"images": images, "segmentation_masks": masks}
        for layer in geometric:
            data = layer(data, training=True)
        images, masks = data["images"], data["segmentation_masks"]
        for layer in photometric:
            images = layer(images, training=True)
        step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(batch_index, tf.int64)])
        s = tf.random.experimental.stateless_split(step_seed, 2)
        images = apply_random_hair(images, s[0])
        images = apply_local_contrast(images, s[1])
        return tf.clip_by_value(images, *VALUE_RANGE), tf.cast(masks > 0.5, tf.float32)

    return augment


def make_cls_augmenter(seed: int = 0) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``fn(images, batch_index) -> images`` for classifier batches (crops)."""
    layers = (
        _geometric_layers(seed)
        + _photometric_layers(seed, strong=True)
        + [
            keras.layers.RandomElasticTransform(factor=0.5, scale=0.05, value_range=VALUE_RANGE, seed=seed + 20),
            keras.layers.RandomErasing(factor=0.3, scale=(0.02, 0.08), value_range=VALUE_RANGE, seed=seed + 21),
        ]
    )

    def augment(images: tf.Tensor, batch_index: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            images = layer(images, training=True)
        step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(batch_index, tf.int64)])
        images = apply_gaussian_noise(images, step_seed)
        return tf.clip_by_value(images, *VALUE_RANGE)

    return augment
