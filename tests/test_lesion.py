"""Crop, hair removal and skin tone (kmel.lesion.lesion) on real expert masks and synthetic images of known truth."""

from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest

from kmel.config import load_config
from kmel.constants import CROP_MODES, ITA_CATEGORIES, SKIN_TONE_GROUPS
from kmel.data.synthetic_images import (
    SKIN_ITA_CATEGORY,
    SKIN_RGB,
    draw_hair,
    make_lesion_image,
)
from kmel.lesion.lesion import (
    clean_mask,
    crop_box,
    enhance_for_segmentation,
    estimate_skin_tone,
    hair_mask,
    model_free_lesion_mask,
    prepare_crop,
    remove_hair,
)

CFG = load_config("cpu-small").crops


def _srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) from sRGB by the textbook formulas, independent of OpenCV."""
    c = np.array(rgb, float) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    x, y, z = m @ lin / np.array([0.95047, 1.0, 1.08883])

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


@pytest.mark.realdata
def test_crops_from_expert_masks_contain_the_whole_lesion(shared_data):
    masks = sorted((shared_data / "isic2018-task1-256" / "masks").glob("*_segmentation.png"))
    assert len(masks) == 2594
    modes: Counter = Counter()
    for path in masks:
        mask = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
        mode, (x0, y0, x1, y1) = crop_box(clean_mask(mask.astype(np.float32), CFG), CFG)
        modes[mode] += 1
        inside = int(mask[y0:y1, x0:x1].sum())
        assert inside == int(mask.sum()), f"{path.name}: {mask.sum() - inside} lesion pixels outside the {mode} crop"
    # Measured: 2,495 lesion crops, 97 lesions covering > 90% of the image, 2 lesions under 0.5%.
    assert modes["lesion"] > 2400 and modes["full_image_too_large"] > 0 and modes["full_image_no_mask"] <= 5


@pytest.mark.realdata
def test_model_free_mask_finds_real_lesions(shared_data):
    """The expert-mask-free fallback used for skin tone: Otsu, beats chance on real images."""
    root = shared_data / "isic2018-task1-256"
    names = sorted((root / "images").glob("*.jpg"))[:200]
    scores = []
    for path in names:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(root / "masks" / f"{path.stem}_segmentation.png"), cv2.IMREAD_GRAYSCALE) > 127
        pred = model_free_lesion_mask(image).astype(bool)
        union = (truth | pred).sum()
        scores.append((truth & pred).sum() / union if union else 1.0)
    assert np.mean(scores) > 0.5


def test_open_outline_mask_is_filled_and_kept_whole():
    mask = np.zeros((200, 200), np.float32)
    cv2.circle(mask, (100, 100), 40, 1.0, 2)  # a closed ring, two pixels wide
    cv2.line(mask, (100, 60), (100, 20), 1.0, 1)  # a thin tail attached to it
    cleaned = clean_mask(mask, CFG)
    assert cleaned[100, 100] == 1, "ring interior filled"
    mode, (x0, y0, x1, y1) = crop_box(cleaned, CFG)
    assert mode == "lesion" and y0 <= 20, "the whole outline, tail included, inside the crop"


def test_fallback_modes_are_hit_and_labelled():
    rng = np.random.default_rng(0)
    image, truth = make_lesion_image(rng, size=128, skin_tone=1, lesion_scale=0.3)
    lesion = prepare_crop(image, truth.astype(np.float32) / max(1, truth.max()), 96, CFG)
    assert lesion.crop_mode == "lesion" and lesion.crop.shape == (96, 96, 3)
    x0, y0, x1, y1 = lesion.box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and (x1 - x0) < 128
    none = prepare_crop(image, None, 96, CFG)
    assert none.crop_mode == "full_image_no_mask" and none.box == (0, 0, 128, 128)
    empty = prepare_crop(image, np.zeros((128, 128), np.float32), 96, CFG)
    assert empty.crop_mode == "full_image_no_mask"
    speck = np.zeros((128, 128), np.float32)
    speck[60:62, 60:62] = 1.0
    assert prepare_crop(image, speck, 96, CFG).crop_mode == "full_image_no_mask"
    everything = prepare_crop(image, np.ones((128, 128), np.float32), 96, CFG)
    assert everything.crop_mode == "full_image_too_large" and everything.box == (0, 0, 128, 128)
    assert set(CROP_MODES) == {"lesion", "full_image_no_mask", "full_image_too_large"}
    with pytest.raises(ValueError, match="does not match"):
        prepare_crop(image, np.zeros((64, 64), np.float32), 96, CFG)


def test_non_square_image_crop_is_square_and_box_in_original_pixels():
    rng = np.random.default_rng(5)
    image, truth = make_lesion_image(rng, size=160, skin_tone=2, lesion_scale=0.25)
    wide = np.concatenate([image, image[:, :80]], axis=1)  # 160 x 240
    prob = np.concatenate([truth, np.zeros_like(truth[:, :80])], axis=1).astype(np.float32) / 255
    result = prepare_crop(wide, prob, 64, CFG)
    x0, y0, x1, y1 = result.box
    assert result.crop.shape == (64, 64, 3) and x1 <= 160 and result.mask.shape == (160, 240)


def test_hair_removal_recovers_the_clean_image():
    errors = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        clean, _ = make_lesion_image(rng, size=256, skin_tone=seed % 5, lesion_scale=0.3)
        hairy, strands = draw_hair(clean, rng, n_hairs=(12, 12))
        restored = remove_hair(hairy, CFG, scale=0.5)
        on_hair = strands > 0
        before = np.abs(hairy.astype(float) - clean)[on_hair].mean()
        after = np.abs(restored.astype(float) - clean)[on_hair].mean()
        errors.append((before, after))
        assert after < 0.2 * before, f"seed {seed}: hair pixels off by {after:.1f} after vs {before:.1f} before"
        found = hair_mask(hairy, CFG, scale=0.5) > 0
        assert found[on_hair].mean() > 0.9, "hair pixels detected"


def test_no_hair_image_comes_out_nearly_unchanged():
    rng = np.random.default_rng(9)
    for tone in range(5):
        clean, _ = make_lesion_image(rng, size=256, skin_tone=tone, lesion_scale=0.3)
        out = remove_hair(clean, CFG, scale=0.5)
        assert np.abs(out.astype(float) - clean).mean() < 1.0


@pytest.mark.parametrize("tone", sorted(SKIN_RGB))
def test_skin_tone_of_known_colours(tone):
    rgb = SKIN_RGB[tone]
    patch = np.empty((200, 200, 3), np.uint8)
    patch[:] = rgb
    noise = np.random.default_rng(tone).normal(0, 3, patch.shape)
    patch = np.clip(patch + noise, 0, 255).astype(np.uint8)
    lesion = np.zeros((200, 200), np.uint8)
    cv2.circle(lesion, (100, 100), 30, 1, -1)
    patch[lesion > 0] = (60, 40, 30)  # a dark lesion that must not count as skin
    result = estimate_skin_tone(patch, lesion, CFG)
    assert result.group_name == SKIN_TONE_GROUPS[tone]
    assert abs(result.brightness - sum(rgb) / 3) < 2.0
    l_star, _, b_star = _srgb_to_lab(rgb)
    expected_ita = math.degrees(math.atan((l_star - 50) / b_star))
    assert result.ita == pytest.approx(expected_ita, abs=2.0)
    assert result.ita_category_name == ITA_CATEGORIES[SKIN_ITA_CATEGORY[tone]]
    assert result.n_pixels > 0.5 * (200 * 200 - np.count_nonzero(lesion))


def test_skin_tone_ignores_dark_vignette_and_border():
    patch = np.empty((240, 240, 3), np.uint8)
    patch[:] = SKIN_RGB[0]
    yy, xx = np.mgrid[0:240, 0:240]
    corners = (yy - 120) ** 2 + (xx - 120) ** 2 > 125**2
    patch[corners] = (10, 10, 10)  # dermatoscope vignette
    patch[:6] = (0, 0, 0)  # black border strip
    result = estimate_skin_tone(patch, None, CFG)
    assert result.group_name == "very_light"


def test_skin_tone_on_synthetic_images_matches_truth():
    rng = np.random.default_rng(21)
    hits = 0
    for i in range(20):
        tone = i % 5
        image, truth = make_lesion_image(rng, size=256, skin_tone=tone, hair=bool(i % 2), lesion_scale=0.3)
        hits += estimate_skin_tone(image, truth > 0, CFG).group == tone
    assert hits >= 18


def test_enhancement_changes_contrast_not_shape():
    rng = np.random.default_rng(3)
    image, _ = make_lesion_image(rng, size=128, skin_tone=4)
    out = enhance_for_segmentation(image, CFG)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.std() > image.std()  # CLAHE spreads the dark-skin histogram


def test_histogram_median_equals_numpy_median():
    from kmel.lesion.lesion import _median_int

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 10, 1001, 50_000):
        values = rng.integers(0, 256, n).astype(np.uint8)
        assert _median_int(values, 256) == np.median(values)
    sums = rng.integers(0, 766, 999).astype(np.float32)
    assert _median_int(sums, 766) == np.median(sums)


def test_shades_of_gray_removes_a_colour_cast_and_keeps_the_skin_tone():
    """A lesion photographed under a warm cast (red ×1.25, blue ×0.8): with ``colour_constancy_p: 6`` the
    classifier crop of the cast image is close to the crop of the neutral one, its channels' p-means are
    equal, and the skin tone (from the original colours) is the cast image's own."""
    from dataclasses import replace

    from kmel.lesion.lesion import (
        apply_colour_gains,
        prepare_crop,
        shades_of_gray_gains,
    )

    rng = np.random.default_rng(0)
    neutral = np.clip(rng.normal(150, 12, (120, 160, 3)), 0, 255).astype(np.uint8)
    neutral[..., 0] = np.clip(neutral[..., 0] * 1.1, 0, 255)  # skin is a little red by nature
    cv2.circle(neutral, (80, 60), 25, (70, 45, 35), -1)
    cast = np.clip(neutral * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)
    mask = np.zeros((120, 160), np.float32)
    cv2.circle(mask, (80, 60), 25, 1.0, -1)
    config = load_config("cpu-small").crops
    on = replace(config, colour_constancy_p=6.0, remove_hair=False)
    balanced = apply_colour_gains(cast, shades_of_gray_gains(cast, 6.0)).reshape(-1, 3).astype(np.float64) / 255
    p_means = np.power(np.mean(np.power(balanced, 6.0), axis=0), 1 / 6)
    assert np.ptp(p_means) < 0.01, p_means
    crops = {name: prepare_crop(image, mask, 64, cfg) for name, image, cfg in (
        ("neutral", neutral, on), ("cast", cast, on), ("cast_off", cast, replace(on, colour_constancy_p=0.0)))}
    gap_on = np.abs(crops["neutral"].crop.astype(float) - crops["cast"].crop).mean()
    gap_off = np.abs(crops["neutral"].crop.astype(float) - crops["cast_off"].crop).mean()
    assert gap_on < 0.4 * gap_off, (gap_on, gap_off)
    assert crops["cast"].skin_tone == crops["cast_off"].skin_tone  # measured on the original colours
