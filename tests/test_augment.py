"""Graph-side augmentation: masks move with images and stay binary; hair darkens; determinism."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kmel.augment import apply_local_contrast, apply_random_hair, make_cls_augmenter, make_seg_augmenter


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
