"""Lesion crop, hair removal and skin tone: the classification preprocessing (OpenCV side).

:func:`prepare_crop` is the one function that turns an image and a lesion probability map into a
classifier input; crop records, ``evaluate`` and ``predict`` all call it (through
:class:`kmel.lesion.crops.CropPipeline`), so training and serving cannot drift apart — the reference
pipeline skipped hair removal at prediction time, kmel cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from kmel.config import CropsConfig
from kmel.constants import (
    CROP_MODES,
    ITA_CATEGORIES,
    ITA_EDGES,
    SKIN_TONE_EDGES,
    SKIN_TONE_GROUPS,
)

WORK_SIDE = 512  # mask cleaning resolution
TONE_SIDE = 256  # skin-tone resolution
MIN_HAIR_FRACTION = 0.001  # below this, hair removal returns the image untouched


@dataclass(frozen=True)
class SkinTone:
    """Skin tone estimated from the photograph (a heuristic; see :func:`estimate_skin_tone`)."""

    group: int
    group_name: str
    brightness: float
    ita: float
    ita_category: int
    ita_category_name: str
    n_pixels: int


@dataclass(frozen=True)
class CropResult:
    crop: np.ndarray  # RGB uint8 size×size×3, hair removed when configured
    crop_mode: str  # one of CROP_MODES
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the input image's pixels
    skin_tone: SkinTone
    mask: np.ndarray  # cleaned lesion mask at the input size, uint8 0/1


def _ellipse(size: int) -> np.ndarray:
    size = max(1, int(size))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def enhance_for_segmentation(image_rgb: np.ndarray, config: CropsConfig) -> np.ndarray:
    """CLAHE on the L channel of Lab, then gamma; feeds the segmenter only (crops use original pixels)."""
    lab = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=config.clahe_clip, tileGridSize=(config.clahe_tiles, config.clahe_tiles))
    lab[..., 0] = clahe.apply(lab[..., 0])
    out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if config.gamma != 1.0:
        lut = (np.linspace(0, 1, 256) ** (1.0 / config.gamma) * 255).round().astype(np.uint8)
        out = cv2.LUT(out, lut)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    flood = np.pad(mask, 1).astype(np.uint8) * 255
    ff_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 255)
    holes = flood[1:-1, 1:-1] == 0
    return (mask.astype(bool) | holes).astype(np.uint8)


def _keep_main_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = areas.max()
    keep = [i + 1 for i, a in enumerate(areas) if a >= max(min_area, 0.3 * largest)]
    return np.isin(labels, keep).astype(np.uint8)


def clean_mask(prob: np.ndarray, config: CropsConfig) -> np.ndarray:
    """Probability map → uint8 0/1 lesion mask: threshold, close, fill holes, open, main components, dilate."""
    mask = (np.asarray(prob, np.float32) >= config.mask_threshold).astype(np.uint8)
    if not mask.any():
        return mask
    # Close and fill first, so a lesion drawn or predicted as a thin ring becomes solid before the
    # opening that removes specks (opening first would erase the ring).
    kernel = _ellipse(config.morph_kernel)
    closed = _fill_holes(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel))
    min_area = config.min_area_fraction * mask.size
    main = _keep_main_components(cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel), min_area)
    if not main.any():  # an open outline falls apart under opening: judge the closed mask instead
        main = _keep_main_components(closed, min_area)
    if not main.any():
        return main
    # Opening chooses the lesion; the lesion's full extent (thin rims and outlines included) comes
    # back from the closed mask's components that the chosen ones touch.
    _, labels = cv2.connectedComponents(closed, connectivity=8)
    touched = np.unique(labels[main > 0])
    mask = np.isin(labels, touched[touched > 0]).astype(np.uint8)
    grow = int(round(config.dilate_fraction * max(mask.shape)))
    if grow > 0:
        mask = cv2.dilate(mask, _ellipse(2 * grow + 1))
    return mask


def model_free_lesion_mask(image_rgb: np.ndarray) -> np.ndarray:
    """A lesion mask without a model: Otsu on a blurred darkness channel, component nearest the centre.

    Dark vignette corners are removed by keeping only the inscribed ellipse when the corners are
    much darker than the centre. Used for skin tone when no expert or predicted mask exists.
    """
    h, w = image_rgb.shape[:2]
    scale = min(1.0, TONE_SIDE / max(h, w))
    small = cv2.resize(image_rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1 else image_rgb
    sh, sw = small.shape[:2]
    if min(sh, sw) < 8:
        return np.zeros((h, w), np.uint8)
    gray = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    valid = np.zeros((sh, sw), np.uint8)
    cv2.ellipse(valid, (sw // 2, sh // 2), (int(sw * 0.48), int(sh * 0.48)), 0, 0, 360, 1, -1)
    corners = gray[valid == 0]
    if corners.size and np.median(corners) < 0.6 * np.median(gray[valid == 1]):
        region = valid.astype(bool)
    else:
        region = np.ones((sh, sw), bool)
    values = gray[region]
    if values.max() - values.min() < 10:
        return np.zeros((h, w), np.uint8)
    thresh, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((gray <= thresh) & region).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _ellipse(3))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(dark, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), np.uint8)
    centre = np.array([sw / 2, sh / 2])
    best, best_score = 0, -math.inf
    for i in range(1, n):
        area = stats[i, cv2.CC_STAT_AREA]
        if area < 0.002 * sh * sw:
            continue
        dist = np.linalg.norm(centroids[i] - centre) / max(sh, sw)
        score = math.log(area) - 6.0 * dist
        if score > best_score:
            best, best_score = i, score
    if best == 0:
        return np.zeros((h, w), np.uint8)
    mask = _fill_holes((labels == best).astype(np.uint8))
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST) if scale < 1 else mask


def crop_box(mask: np.ndarray, config: CropsConfig) -> tuple[str, tuple[int, int, int, int]]:
    """(crop_mode, (x0, y0, x1, y1)): lesion box + margin grown to a square and clipped, or the whole image."""
    h, w = mask.shape[:2]
    area = int(np.count_nonzero(mask))
    full = (0, 0, w, h)
    if area == 0 or area < config.min_area_fraction * h * w:
        return CROP_MODES[1], full
    if area > config.max_area_fraction * h * w:
        return CROP_MODES[2], full
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0)
    side = int(math.ceil(side * (1 + 2 * config.margin)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx0, by0 = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
    box = (max(0, bx0), max(0, by0), min(w, bx0 + side), min(h, by0 + side))
    return CROP_MODES[0], box


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def hair_mask(image_rgb: np.ndarray, config: CropsConfig, scale: float = 1.0) -> np.ndarray:
    """Thin dark strands: black-hat of the grey image, thresholded, slightly dilated (uint8 0/1)."""
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    element = cv2.getStructuringElement(cv2.MORPH_CROSS, (_odd(config.hair_kernel * scale),) * 2)
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, element)
    blackhat = cv2.GaussianBlur(blackhat, (3, 3), 0)
    mask = (blackhat > config.hair_threshold).astype(np.uint8)
    return cv2.dilate(mask, _ellipse(3))


def remove_hair(image_rgb: np.ndarray, config: CropsConfig, scale: float = 1.0) -> np.ndarray:
    """Black-hat hair detection + Telea inpainting; an image without hair comes back unchanged."""
    mask = hair_mask(image_rgb, config, scale)
    if mask.mean() < MIN_HAIR_FRACTION:
        return image_rgb
    radius = max(1, int(round(config.inpaint_radius * max(scale, 0.25))))
    return cv2.inpaint(image_rgb, mask * 255, radius, cv2.INPAINT_TELEA)


def _group(brightness: float) -> int:
    # SKIN_TONE_EDGES ascend (96, 128, 160, 192); group 0 (very_light) is the brightest.
    return len(SKIN_TONE_EDGES) - int(np.searchsorted(SKIN_TONE_EDGES, brightness, side="left"))


def _ita_category(ita: float) -> int:
    for i, edge in enumerate(ITA_EDGES):  # descending: 55, 41, 28, 10, -30
        if ita > edge:
            return i
    return len(ITA_EDGES)


def ita_angle(l_star: float, b_star: float) -> float:
    """ITA = atan((L* − 50) / b*) · 180/π, with b* clamped to ≥ 0.5 so near-grey skin stays finite."""
    return math.degrees(math.atan((l_star - 50.0) / max(b_star, 0.5)))


def _median_int(values: np.ndarray, n_bins: int) -> float:
    """``np.median`` of non-negative integer-valued data (any dtype) through a histogram."""
    counts = np.cumsum(np.bincount(values.astype(np.int64).ravel(), minlength=n_bins))
    n = int(counts[-1])
    low = int(np.searchsorted(counts, (n - 1) // 2, side="right"))
    high = int(np.searchsorted(counts, n // 2, side="right"))
    return (low + high) / 2.0


def estimate_skin_tone(image_rgb: np.ndarray, lesion_mask: np.ndarray | None, config: CropsConfig) -> SkinTone:
    """Skin tone from the skin around the lesion: brightness group and ITA category.

    Skin = not the (dilated) lesion, not the image border, not dark vignette corners, not hair.
    This is a heuristic from photo brightness and colour; it moves with lighting and camera and is
    not a Fitzpatrick measurement.
    """
    h, w = image_rgb.shape[:2]
    scale = min(1.0, TONE_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else image_rgb
    sh, sw = small.shape[:2]
    lesion = np.zeros((sh, sw), np.uint8)
    if lesion_mask is not None and lesion_mask.any():
        lesion = cv2.resize(lesion_mask.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
        lesion = cv2.dilate(lesion, _ellipse(_odd(0.04 * max(sh, sw))))
    # Sum of R+G+B as exact integers 0–765 (float32): mean brightness is sum / 3, and medians of
    # integer data come from a histogram, several times faster than np.median on 50k pixels.
    rgb_sum = cv2.transform(small.astype(np.float32), np.ones((1, 3), np.float32))
    skin = lesion == 0
    border = int(round(config.skin_border * max(sh, sw)))
    if border and min(sh, sw) > 4 * border:
        inner = np.zeros_like(skin)
        inner[border : sh - border, border : sw - border] = True
        skin &= inner
    if skin.any():
        skin &= rgb_sum >= 0.5 * _median_int(rgb_sum[skin], 766)
    skin &= hair_mask(small, config, scale=max(sh, sw) / 512) == 0
    if skin.sum() < config.skin_min_pixels:
        skin = lesion == 0
        if not skin.any():
            skin = np.ones((sh, sw), bool)
    brightness = float(rgb_sum[skin].mean(dtype=np.float64)) / 3.0
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)
    l_star = _median_int(lab[..., 0][skin], 256) * 100.0 / 255.0
    b_star = _median_int(lab[..., 2][skin], 256) - 128.0
    ita = ita_angle(l_star, b_star)
    group, category = _group(brightness), _ita_category(ita)
    return SkinTone(group, SKIN_TONE_GROUPS[group], brightness, ita, category, ITA_CATEGORIES[category],
                    int(skin.sum()))


def shades_of_gray_gains(image_rgb: np.ndarray, p: float) -> np.ndarray:
    """Per-channel gains that make ``image_rgb``'s Minkowski ``p``-mean grey (Shades of Gray colour
    constancy, Finlayson & Trezzi 2004; p = 1 is grey-world, p → ∞ max-RGB). The gains keep the mean
    brightness: they divide each channel's p-mean by the mean of the three. Estimated on the image at most
    256 px on its long side (the illuminant is a global property)."""
    h, w = image_rgb.shape[:2]
    scale = min(1.0, 256 / max(h, w))
    small = cv2.resize(image_rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image_rgb
    x = small.reshape(-1, 3).astype(np.float64) / 255.0
    norms = np.power(np.mean(np.power(x, p), axis=0), 1.0 / p)
    norms = np.maximum(norms, 1e-6)
    return (norms.mean() / norms).astype(np.float32)


def apply_colour_gains(image_rgb: np.ndarray, gains: np.ndarray) -> np.ndarray:
    return np.clip(image_rgb.astype(np.float32) * gains, 0, 255).round().astype(np.uint8)


def prepare_crop(image_rgb: np.ndarray, prob: np.ndarray | None, size: int, config: CropsConfig) -> CropResult:
    """Image (+ lesion probability map of the same H×W, or None) → classifier crop and its provenance."""
    h, w = image_rgb.shape[:2]
    if prob is None:
        mask = np.zeros((h, w), np.uint8)
    else:
        if prob.shape[:2] != (h, w):
            raise ValueError(f"probability map {prob.shape[:2]} does not match image {(h, w)}")
        scale = min(1.0, WORK_SIDE / max(h, w))
        work = cv2.resize(prob.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_AREA) if scale < 1 else prob.astype(np.float32)
        mask = clean_mask(work, config)
        if scale < 1:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    mode, (x0, y0, x1, y1) = crop_box(mask, config)
    cut = image_rgb[y0:y1, x0:x1]
    if config.colour_constancy_p > 0:  # gains from the whole image, applied to the crop only
        cut = apply_colour_gains(cut, shades_of_gray_gains(image_rgb, config.colour_constancy_p))
    ch, cw = cut.shape[:2]
    if ch != cw:
        side = max(ch, cw)
        top, left = (side - ch) // 2, (side - cw) // 2
        border = cv2.BORDER_REFLECT_101 if min(ch, cw) > 1 else cv2.BORDER_REPLICATE
        cut = cv2.copyMakeBorder(cut, top, side - ch - top, left, side - cw - left, border)
    interp = cv2.INTER_AREA if cut.shape[0] > size else cv2.INTER_LINEAR
    crop = cv2.resize(cut, (size, size), interpolation=interp)
    if config.remove_hair:
        crop = remove_hair(crop, config, scale=size / 512)
    tone = estimate_skin_tone(image_rgb, mask if mask.any() else model_free_lesion_mask(image_rgb), config)
    return CropResult(np.ascontiguousarray(crop), mode, (int(x0), int(y0), int(x1), int(y1)), tone, mask)
