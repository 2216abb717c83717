"""Graph-side augmentation: masks move with images and stay binary; hair darkens; determinism."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kmel.data.augment import (
    apply_coarse_dropout,
    apply_color_jitter,
    apply_elastic_warp,
    apply_local_contrast,
    apply_pixel_noise,
    apply_random_affine,
    apply_random_blur,
    apply_random_hair,
    make_cls_augmenter,
    make_seg_augmenter,
)


def _batch(n=4, size=48):
    images = np.full((n, size, size, 3), 180.0, np.float32)
    masks = np.zeros((n, size, size, 1), np.float32)
    masks[:, 12:30, 10:26] = 1.0
    images[masks[..., 0] > 0] = 60.0
    return tf.constant(images), tf.constant(masks)


def test_seg_augmenter_keeps_masks_binary_and_aligned():
    images, masks = _batch()
    out_images, out_masks = make_seg_augmenter(seed=3)(images, masks, tf.constant(0, tf.int64))
    m = out_masks.numpy()
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    lesion = out_images.numpy().mean(axis=-1)[m[..., 0] > 0.5]
    skin = out_images.numpy().mean(axis=-1)[m[..., 0] < 0.5]
    # The dark lesion must still sit under the transformed mask.
    assert np.median(lesion) < np.median(skin) - 40
    assert 0.0 <= out_images.numpy().min() and out_images.numpy().max() <= 255.0


def test_hair_draws_dark_strands_only_when_drawn():
    images, _ = _batch(n=8)
    seed = tf.constant([1, 2], tf.int64)
    none = apply_random_hair(images, seed, probability=0.0)
    np.testing.assert_allclose(none.numpy(), images.numpy())
    hairy = apply_random_hair(images, seed, probability=1.0).numpy()
    changed = np.abs(hairy - images.numpy()).max(axis=-1) > 1
    assert changed.mean() > 0.005
    assert (hairy.mean(axis=-1)[changed] < images.numpy().mean(axis=-1)[changed]).mean() > 0.7
    again = apply_random_hair(images, seed, probability=1.0).numpy()
    np.testing.assert_array_equal(hairy, again)


def test_local_contrast_raises_detail():
    images, _ = _batch()
    out = apply_local_contrast(images, tf.constant([0, 1], tf.int64), probability=1.0).numpy()
    assert out.std() > images.numpy().std()


def test_cls_augmenter_runs_in_tf_data():
    images, _ = _batch()
    aug = make_cls_augmenter(seed=0)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(2).enumerate().map(lambda i, x: aug(x, i))
    out = np.concatenate([b.numpy() for b in ds])
    assert out.shape == images.shape and np.isfinite(out).all()


def test_affine_with_only_flips_gives_the_four_exact_flips():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 24, 24, 3)).astype(np.float32)
    batch = tf.constant(np.repeat(image, 64, axis=0))
    out = apply_random_affine(batch, tf.constant([5, 6], tf.int64), rotation=0.0, zoom=0.0, translation=0.0,
                              shear=0.0).numpy()
    flips = [image[0], image[0][:, ::-1], image[0][::-1], image[0][::-1, ::-1]]
    seen = [int(np.argmin([np.abs(o - f).max() for f in flips])) for o in out]
    assert all(np.abs(o - flips[k]).max() < 1e-3 for o, k in zip(out, seen))
    assert set(seen) == {0, 1, 2, 3}


def test_affine_moves_mask_with_image_and_is_reproducible():
    images, masks = _batch(n=16, size=64)
    seed = tf.constant([1, 9], tf.int64)
    out_images, out_masks = apply_random_affine(images, seed, masks)
    again, _ = apply_random_affine(images, seed, masks)
    np.testing.assert_array_equal(out_images.numpy(), again.numpy())
    other, _ = apply_random_affine(images, tf.constant([1, 10], tf.int64), masks)
    assert np.abs(other.numpy() - out_images.numpy()).max() > 1
    m = out_masks.numpy()[..., 0]
    assert set(np.unique(m)) <= {0.0, 1.0}
    grey = out_images.numpy().mean(axis=-1)
    # The dark square (60) moves with its mask; the area is kept within the zoom range (0.85–1.15)².
    assert (grey[m > 0.5] < 120).mean() > 0.95 and (grey[m < 0.5] > 120).mean() > 0.95
    area = m.sum(axis=(1, 2)) / masks.numpy()[..., 0].sum(axis=(1, 2))
    assert ((area > 0.6) & (area < 1.5)).all(), area


def test_color_jitter_keeps_grey_grey_and_hue_keeps_luma():
    rng = np.random.default_rng(1)
    grey = np.repeat(rng.uniform(40, 200, (8, 16, 16, 1)), 3, axis=-1).astype(np.float32)
    out = apply_color_jitter(tf.constant(grey), tf.constant([0, 3], tf.int64), saturation=0.9, hue=0.2).numpy()
    assert np.abs(out - grey).max() > 5  # brightness / contrast did change it
    assert np.abs(out - out.mean(axis=-1, keepdims=True)).max() < 0.05  # but no colour appeared
    colour = rng.uniform(60, 190, (8, 16, 16, 3)).astype(np.float32)
    hued = apply_color_jitter(tf.constant(colour), tf.constant([0, 4], tf.int64), brightness=0.0, contrast=0.0,
                              saturation=0.0, hue=0.05).numpy()
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(hued @ luma, colour @ luma, atol=0.05)
    assert np.abs(hued - colour).max() > 3


def test_blur_is_per_image_and_normalised():
    rng = np.random.default_rng(2)
    noise = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    flat = np.full((1, 32, 32, 3), 100.0, np.float32)
    batch = tf.constant(np.concatenate([noise, flat]))
    out = apply_random_blur(batch, tf.constant([0, 1], tf.int64), probability=1.0, sigma=(1.0, 1.2)).numpy()
    np.testing.assert_allclose(out[1], flat[0], atol=1e-3)  # no bleeding between images in the batch
    assert out[0].std() < 0.7 * noise.std()
    same = apply_random_blur(batch, tf.constant([0, 1], tf.int64), probability=0.0).numpy()
    np.testing.assert_allclose(same, batch.numpy(), atol=1e-3)


def test_elastic_warp_is_smooth_local_and_identity_when_off():
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    ramp = np.repeat(np.stack([y * 4, x * 4, (y + x) * 2], axis=-1)[None], 4, axis=0)
    seed = tf.constant([2, 3], tf.int64)
    same = apply_elastic_warp(tf.constant(ramp), seed, probability=0.0).numpy()
    np.testing.assert_allclose(same, ramp, atol=1e-3)
    warped = apply_elastic_warp(tf.constant(ramp), seed, probability=1.0, magnitude=0.05).numpy()
    # Channel 0 encodes the source row ×4, channel 1 the source column ×4: read the displacement back.
    dy, dx = warped[..., 0] / 4 - y, warped[..., 1] / 4 - x
    assert np.abs(dy).max() > 0.5 and np.abs(dx).max() > 0.5  # it moved pixels
    assert np.abs(dy).max() <= 0.05 * 64 + 1e-3 and np.abs(dx).max() <= 0.05 * 64 + 1e-3
    inner = (slice(None), slice(8, 56), slice(8, 56))  # away from the clamped edges
    assert np.abs(np.diff(dy[inner], axis=1)).max() < 0.5  # neighbours move together: smooth, not noise
    assert np.abs(np.diff(dx[inner], axis=2)).max() < 0.5
    assert not np.allclose(dy[0], dy[1])  # each image gets its own field


def test_coarse_dropout_blanks_one_box_with_the_mean_colour():
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 255, (64, 40, 40, 3)).astype(np.float32)
    out = apply_coarse_dropout(tf.constant(images), tf.constant([1, 1], tf.int64), probability=0.5).numpy()
    changed = np.abs(out - images).max(axis=-1) > 1e-4
    hit = changed.any(axis=(1, 2))
    assert 15 < hit.sum() < 50  # about half the batch
    for k in np.flatnonzero(hit):
        rows, cols = np.flatnonzero(changed[k].any(axis=1)), np.flatnonzero(changed[k].any(axis=0))
        box = np.zeros_like(changed[k])
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert (changed[k] == box).mean() > 0.99  # one rectangle
        assert 0.01 < box.mean() < 0.1
        np.testing.assert_allclose(out[k][box].mean(axis=0), images[k].mean(axis=(0, 1)), atol=1e-2)


def test_pixel_noise_zero_mean_bounded_std():
    images = np.full((16, 32, 32, 3), 128.0, np.float32)
    out = apply_pixel_noise(tf.constant(images), tf.constant([0, 5], tf.int64), max_std=8.0).numpy()
    diff = out - images
    stds = diff.std(axis=(1, 2, 3))
    assert abs(diff.mean()) < 0.2 and stds.max() <= 8.3 and stds.max() > 2.0


def test_light_cls_policy_keeps_hue_and_texture():
    """``light`` (fine-tuning): geometry and brightness/contrast only — no hue rotation, noise or dropout."""
    from kmel.config import ConfigError

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    grey = np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)  # a grey image has no chroma to rotate
    batch = tf.constant(np.repeat(grey, 16, axis=0))
    light = make_cls_augmenter(seed=3, policy="light")(batch, tf.constant(0, tf.int64)).numpy()
    strong = make_cls_augmenter(seed=3, policy="strong")(batch, tf.constant(0, tf.int64)).numpy()
    chroma = lambda x: np.abs(x - x.mean(-1, keepdims=True)).max()  # noqa: E731
    assert chroma(light) < 1e-2  # stays grey: brightness/contrast/saturation cannot colour a grey image
    assert chroma(strong) > 1.0  # pixel noise is drawn per channel
    with pytest.raises(ConfigError, match="augment_policy"):
        make_cls_augmenter(policy="medium")
    from kmel.data.augment import resolve_cls_policy

    assert resolve_cls_policy("auto", "imagenet") == "light" and resolve_cls_policy("auto", "none") == "strong"
    assert resolve_cls_policy("strong", "imagenet") == "strong"
