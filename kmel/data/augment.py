"""Training-time augmentation inside tf.data: TensorFlow / Keras ops only (graph side).

Applied to whole batches after ``batch()``. Flips, rotation, zoom, shear and shift are composed
into one affine map per image and applied in a single resampling (image and mask together, the
mask thresholded back to 0/1); colour jitter and blur are a few batched multiply-adds. Chaining the
equivalent Keras preprocessing layers resampled every batch five times and was the input
pipeline's bottleneck (bench/input_pipeline.py); so were Keras' elastic transform (a full-size
random field blurred with a large kernel) and random erasing, replaced here by a coarse-lattice
warp and a masked fill. All ops draw stateless random numbers from ``(seed, batch index)``, so a
run is reproducible.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
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


def apply_pixel_noise(images: tf.Tensor, seed: tf.Tensor, max_std: float = 8.0) -> tf.Tensor:
    """Zero-mean pixel noise with a per-image standard deviation in [0, ``max_std``] grey levels.

    Uniform rather than Gaussian (same standard deviation): drawing normal numbers for every pixel
    cost three times as much and the shape of the noise does not matter here."""
    b = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    std = tf.random.stateless_uniform([b, 1, 1, 1], seeds[0], 0.0, max_std)
    noise = tf.random.stateless_uniform(tf.shape(images), seeds[1], -1.0, 1.0) * (std * np.sqrt(3.0))
    return tf.clip_by_value(images + noise, *VALUE_RANGE)


def apply_elastic_warp(
    images: tf.Tensor, seed: tf.Tensor, probability: float = 0.5, magnitude: float = 0.04, grid: int = 4
) -> tf.Tensor:
    """Elastic-like warp: a random displacement field on a ``grid``×``grid`` lattice (at most
    ``magnitude`` of the side), bilinearly upsampled so it is smooth, then bilinear resampling
    (edges clamped). Applied to a random ``probability`` share of the batch."""
    shape = tf.shape(images)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    # Warp only the chosen images (the resampling is the expensive part), then put them back.
    chosen = tf.where(tf.random.stateless_uniform([shape[0]], seeds[0]) < probability)
    warped = _warp(tf.gather_nd(images, chosen), seeds[1], magnitude, grid)
    out = tf.tensor_scatter_nd_update(images, chosen, warped)
    out.set_shape(images.shape)
    return out


def _warp(images: tf.Tensor, seed: tf.Tensor, magnitude: float, grid: int) -> tf.Tensor:
    shape = tf.shape(images)
    b, h, w, c = shape[0], shape[1], shape[2], images.shape[-1]
    side = tf.cast(tf.maximum(h, w), tf.float32)
    coarse = tf.random.stateless_uniform([b, grid, grid, 2], seed, -1.0, 1.0) * magnitude * side
    field = tf.image.resize(coarse, tf.stack([h, w]), method="bilinear")  # [b, h, w, (dy, dx)]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    y = tf.clip_by_value(tf.range(hf)[None, :, None] + field[..., 0], 0.0, hf - 1.0)
    x = tf.clip_by_value(tf.range(wf)[None, None, :] + field[..., 1], 0.0, wf - 1.0)
    y0, x0 = tf.floor(y), tf.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, h - 1), tf.minimum(x0 + 1, w - 1)
    flat = tf.reshape(images, [b, h * w, c])

    def corner(yi: tf.Tensor, xi: tf.Tensor) -> tf.Tensor:
        return tf.reshape(tf.gather(flat, tf.reshape(yi * w + xi, [b, -1]), batch_dims=1), [b, h, w, c])

    top = corner(y0, x0) * (1.0 - wx) + corner(y0, x1) * wx
    bottom = corner(y1, x0) * (1.0 - wx) + corner(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


def apply_coarse_dropout(
    images: tf.Tensor, seed: tf.Tensor, probability: float = 0.3, area: tuple[float, float] = (0.02, 0.08)
) -> tf.Tensor:
    """Blank one rectangle (``area`` share of the image, aspect 1:2–2:1) with the image's mean
    colour on a random ``probability`` share of the batch."""
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    on = tf.random.stateless_uniform([b], seeds[0]) < probability
    size = tf.sqrt(tf.random.stateless_uniform([b], seeds[1], *area))
    aspect = tf.exp(tf.random.stateless_uniform([b], seeds[2], -np.log(2.0), np.log(2.0)))
    half_h, half_w = size * tf.sqrt(aspect) / 2.0, size / tf.sqrt(aspect) / 2.0
    centre = tf.random.stateless_uniform([b, 2], seeds[3])
    rows = (tf.range(tf.cast(h, tf.float32)) + 0.5) / tf.cast(h, tf.float32)
    cols = (tf.range(tf.cast(w, tf.float32)) + 0.5) / tf.cast(w, tf.float32)
    in_rows = tf.abs(rows[None, :] - centre[:, 0:1]) <= half_h[:, None]
    in_cols = tf.abs(cols[None, :] - centre[:, 1:2]) <= half_w[:, None]
    box = tf.logical_and(tf.logical_and(in_rows[:, :, None], in_cols[:, None, :]), on[:, None, None])
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return tf.where(box[..., None], mean, images)


def random_affine_transforms(
    batch: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    rotation: float = 1.0,
    zoom: float = 0.15,
    translation: float = 0.08,
    shear: float = 0.08,
) -> tf.Tensor:
    """Per-image output→input maps ``[batch, 8]`` for ``ImageProjectiveTransformV3``: random flips,
    rotation (± ``rotation``·π), zoom (scale 1 ± ``zoom``), shear and translation (fractions of
    the side) composed into one affine matrix, so a batch is interpolated once, not five times."""
    seeds = tf.random.experimental.stateless_split(seed, 6)
    theta = tf.random.stateless_uniform([batch], seeds[0], -rotation * np.pi, rotation * np.pi)
    scale = tf.random.stateless_uniform([batch], seeds[1], 1.0 - zoom, 1.0 + zoom)
    flips = tf.where(tf.random.stateless_uniform([batch, 2], seeds[2]) < 0.5, -1.0, 1.0)
    sh = tf.random.stateless_uniform([batch], seeds[3], -shear, shear)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    shift = tf.random.stateless_uniform([batch, 2], seeds[4], -translation, translation) * tf.stack([w, h])
    cos, sin = tf.cos(theta), tf.sin(theta)
    # A = R(theta) @ [[1, sh], [0, 1]] @ diag(flip_x, flip_y) / scale  (output offset → input offset)
    a00 = cos * flips[:, 0] / scale
    a01 = (cos * sh - sin) * flips[:, 1] / scale
    a10 = sin * flips[:, 0] / scale
    a11 = (sin * sh + cos) * flips[:, 1] / scale
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a02 = cx + shift[:, 0] - a00 * cx - a01 * cy
    a12 = cy + shift[:, 1] - a10 * cx - a11 * cy
    zeros = tf.zeros_like(a00)
    return tf.stack([a00, a01, a02, a10, a11, a12, zeros, zeros], axis=1)


def apply_random_affine(images: tf.Tensor, seed: tf.Tensor, masks: tf.Tensor | None = None, **ranges: float):
    """One bilinear, reflect-padded resampling of images (and masks, thresholded back to 0/1)."""
    shape = tf.shape(images)
    transforms = random_affine_transforms(shape[0], shape[1], shape[2], seed, **ranges)
    channels = images.shape[-1]
    stacked = images if masks is None else tf.concat([images, tf.cast(masks, images.dtype)], axis=-1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    )
    out.set_shape(stacked.shape)
    if masks is None:
        return out
    return out[..., :channels], tf.cast(out[..., channels:] > 0.5, masks.dtype)


def apply_color_jitter(
    images: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 0.15,
    contrast: float = 0.2,
    saturation: float = 0.3,
    hue: float = 0.03,
) -> tf.Tensor:
    """Per-image brightness (± fraction of 255), contrast and saturation (× 1 ± factor) and hue
    (a rotation of the chroma plane in YIQ by ± ``hue``·2π): a few multiply-adds, no HSV round trip."""
    b = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    images = images + tf.random.stateless_uniform([b, 1, 1, 1], seeds[0], -brightness, brightness) * 255.0
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = mean + (images - mean) * tf.random.stateless_uniform([b, 1, 1, 1], seeds[1], 1 - contrast, 1 + contrast)
    # RGB → YIQ, scale and rotate (I, Q), back: one 3×3 matrix per image.
    to_yiq = tf.constant([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = tf.linalg.inv(to_yiq)
    sat = tf.random.stateless_uniform([b], seeds[2], 1 - saturation, 1 + saturation)
    angle = tf.random.stateless_uniform([b], seeds[3], -hue, hue) * 2.0 * np.pi
    cos, sin = tf.cos(angle) * sat, tf.sin(angle) * sat
    one, zero = tf.ones_like(cos), tf.zeros_like(cos)
    chroma = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], axis=1), [b, 3, 3])
    matrix = tf.einsum("ij,bjk,kl->bil", from_yiq, chroma, to_yiq)  # rgb_out = M @ rgb_in
    images = tf.einsum("bhwc,bdc->bhwd", images, matrix)
    return tf.clip_by_value(images, *VALUE_RANGE)


def apply_random_blur(
    images: tf.Tensor, seed: tf.Tensor, probability: float = 0.5, sigma: tuple[float, float] = (0.1, 1.2)
) -> tf.Tensor:
    """Separable 5-tap Gaussian blur with a per-image sigma on a random subset of the batch
    (batch folded into channels: one depthwise convolution for the whole batch)."""
    shape = tf.shape(images)
    b, h, w, c = shape[0], shape[1], shape[2], images.shape[-1]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    s = tf.random.stateless_uniform([b], seeds[0], *sigma)
    on = tf.random.stateless_uniform([b], seeds[1]) < probability
    taps = tf.constant([-2.0, -1.0, 0.0, 1.0, 2.0])
    kernel = tf.exp(-(taps[None, :] ** 2) / (2.0 * s[:, None] ** 2))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)
    identity = tf.constant([0.0, 0.0, 1.0, 0.0, 0.0])
    kernel = tf.where(on[:, None], kernel, identity[None, :])  # [b, 5]
    kernel = tf.repeat(kernel, c, axis=0)  # [b*c, 5], channel-major per image
    folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, h, w, b * c])
    padded = tf.pad(folded, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    kx = tf.reshape(tf.transpose(kernel), [1, 5, b * c, 1])
    ky = tf.reshape(tf.transpose(kernel), [5, 1, b * c, 1])
    out = tf.nn.depthwise_conv2d(padded, kx, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
    out = tf.transpose(tf.reshape(out, [h, w, b, c]), [2, 0, 1, 3])
    out.set_shape(images.shape)
    return out


def _step_seeds(seed: int, batch_index: tf.Tensor, n: int) -> tf.Tensor:
    step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(batch_index, tf.int64)])
    return tf.random.experimental.stateless_split(step_seed, n)


def make_seg_augmenter(seed: int = 0) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """``fn(images, masks, batch_index) -> (images, masks)`` for segmentation batches: one affine
    resampling (flips, any rotation, zoom, shear, shift) of image and mask together, mild colour
    jitter, blur, synthetic hair and local contrast. Random numbers come from ``(seed, batch_index)``."""

    def augment(images: tf.Tensor, masks: tf.Tensor, batch_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        s = _step_seeds(seed, batch_index, 5)
        images, masks = apply_random_affine(images, s[0], masks)
        images = apply_color_jitter(images, s[1], saturation=0.1, hue=0.0)
        images = apply_random_blur(images, s[2])
        images = apply_random_hair(images, s[3])
        images = apply_local_contrast(images, s[4])
        return tf.clip_by_value(images, *VALUE_RANGE), masks

    return augment


CLS_AUGMENT_POLICIES = ("strong", "light")


def resolve_cls_policy(policy: str, weights: str) -> str:
    """``auto``: ``light`` when fine-tuning pretrained weights, ``strong`` from scratch (``weights: none``)."""
    if policy == "auto":
        return "strong" if weights in ("none", "", None) else "light"
    return policy


def make_cls_augmenter(seed: int = 0, policy: str = "strong") -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``fn(images, batch_index) -> images`` for classifier batches (crops).

    ``strong`` (training from scratch, where the network must not memorise 1–2 k crops): affine,
    colour jitter with hue and saturation, blur, elastic-like warp, coarse dropout and pixel noise.
    ``light`` (fine-tuning a pretrained backbone): the same affine (dermoscopy has no up or down),
    brightness / contrast and a little saturation, no hue shift, no warp, dropout or noise —
    colour and texture are the cues a pretrained network reads, and on 1,600 real crops the strong
    stack kept even the training AUC near chance.
    """
    if policy not in CLS_AUGMENT_POLICIES:
        from kmel.config import ConfigError

        raise ConfigError(f"classifier augment_policy must be one of {CLS_AUGMENT_POLICIES}, got {policy!r}")

    def augment(images: tf.Tensor, batch_index: tf.Tensor) -> tf.Tensor:
        s = _step_seeds(seed, batch_index, 6)
        images = apply_random_affine(images, s[0])
        if policy == "light":
            images = apply_color_jitter(images, s[1], brightness=0.1, contrast=0.15, saturation=0.1, hue=0.0)
            return tf.clip_by_value(images, *VALUE_RANGE)
        images = apply_color_jitter(images, s[1], saturation=0.3, hue=0.03)
        images = apply_random_blur(images, s[2])
        images = apply_elastic_warp(images, s[3])
        images = apply_coarse_dropout(images, s[4])
        images = apply_pixel_noise(images, s[5])
        return tf.clip_by_value(images, *VALUE_RANGE)

    return augment
