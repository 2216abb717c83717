"""Synthetic dermoscopy-like images and an ISIC-shaped data folder for the demo and the core tests.

NumPy + OpenCV only. Everything is drawn from an explicit ``numpy.random.Generator`` so a seed gives
the same bytes. The images are not realistic enough to train a real model, but they keep the cues
the pipeline relies on: the lesion is darker than the skin, the mask covers it, malignant lesions
have irregular borders and several colours (so the demo can learn), the skin colour lands in a
known brightness group and ITA category (so skin-tone estimation can be checked), and hair can be
drawn with its own mask (so hair removal can be checked).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kmel.constants import ITA_CATEGORIES, SKIN_TONE_GROUPS

# === Skin ===
# Base sRGB colours per group of kmel.constants.SKIN_TONE_GROUPS. Each sits near the middle of its
# brightness group (mean of R, G, B; edges 96/128/160/192) and of the ITA category in
# SKIN_ITA_CATEGORY, so shading, noise and per-image jitter do not push it across an edge.
SKIN_RGB: dict[int, tuple[int, int, int]] = {
    0: (248, 214, 192),  # very_light: brightness 218, ITA ~68 deg
    1: (218, 168, 142),  # light:      brightness 176, ITA ~48 deg
    2: (174, 138, 120),  # medium:     brightness 144, ITA ~35 deg
    3: (142, 106, 88),  # tan:        brightness 112, ITA ~-8 deg
    4: (98, 70, 48),  # dark:       brightness  72, ITA ~-45 deg
}
# ITA category (index into kmel.constants.ITA_CATEGORIES) each base colour lands in. "tan" maps to
# ITA "brown": a brightness of 96-128 with ITA above 10 deg needs a nearly grey colour (b* < 10)
# right at the brightness edge, so a skin-like tan colour has an ITA near -8 deg.
SKIN_ITA_CATEGORY: dict[int, int] = {
    0: ITA_CATEGORIES.index("very_light"),
    1: ITA_CATEGORIES.index("light"),
    2: ITA_CATEGORIES.index("intermediate"),
    3: ITA_CATEGORIES.index("brown"),
    4: ITA_CATEGORIES.index("dark"),
}
# Lighter tones are more common, as in the ISIC archive; every group keeps at least 5%.
SKIN_TONE_WEIGHTS = (0.32, 0.26, 0.18, 0.12, 0.12)
MIN_TONE_FRACTION = 0.05

# === Pigments ===
# Optical densities per RGB channel: a pigmented pixel is skin * exp(-density * od), so pigment
# always darkens whatever skin it sits on, on every tone.
OD_BROWN = np.array([0.55, 0.85, 1.10], np.float32)
OD_DARK_BROWN = np.array([1.05, 1.40, 1.65], np.float32)
OD_BLACK = np.array([2.20, 2.30, 2.30], np.float32)
OD_BLUE_GREY = np.array([0.85, 0.62, 0.36], np.float32)
OD_REDDISH = np.array([0.30, 0.85, 0.85], np.float32)
MALIGNANT_EXTRA_ODS = (OD_BLACK, OD_BLUE_GREY, OD_REDDISH, OD_DARK_BROWN)

# === Data folder layout ===
GT_2019_CSV = "ISIC_2019_Training_GroundTruth.csv"
META_2019_CSV = "ISIC_2019_Training_Metadata.csv"
GT_2020_CSV = "ISIC_2020_Training_GroundTruth_v2.csv"
TRUTH_CSV = "synthetic_truth.csv"
GT_2019_COLUMNS = ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
META_2019_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
GT_2020_COLUMNS = ("image_name", "patient_id", "lesion_id", "sex", "age_approx",
                   "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target")
FIRST_ID = 9_000_000  # far above real ISIC ids, so synthetic and real images never collide
FIRST_PREDICT_ID = 9_900_000
FIRST_PATIENT_ID = 9_100_000
FIRST_LESION_ID = 9_200_000
LANDSCAPE_FRACTION = 0.3
LANDSCAPE_RATIO = 0.75
JPEG_QUALITY = 95
SITES_2019 = ("anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck",
              "palms/soles")
SITES_2020 = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles")


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field varying over about ``cells`` cells across the image."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return field - field.mean()


def _blurred_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """White noise blurred with ``sigma`` px and rescaled to unit standard deviation."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _make_skin(rng: np.random.Generator, h: int, w: int, skin_tone: int) -> np.ndarray:
    """Float32 RGB skin (0-255): base colour, low-frequency shading, texture; no vignette yet."""
    base = np.asarray(SKIN_RGB[skin_tone], np.float32)
    # A little per-image variation in brightness and hue, small enough to keep the group.
    base = base * float(rng.uniform(0.98, 1.02)) + rng.uniform(-1.5, 1.5, 3).astype(np.float32)
    scale = min(h, w) / 256.0
    shading = 1.0 + 0.025 * _smooth_field(rng, h, w, 3)
    texture = (1.0 + 0.022 * _blurred_noise(rng, h, w, 1.3 * scale)
               + 0.015 * _blurred_noise(rng, h, w, 5.0 * scale))
    # Slight redness in patches (blood under the skin), stronger in the red channel.
    redness = 0.02 * _smooth_field(rng, h, w, 5)
    skin = base[None, None, :] * (shading * texture)[..., None]
    skin[..., 0] *= 1.0 + redness
    skin[..., 1:] *= (1.0 - 0.5 * redness)[..., None]
    return skin


def _vignette(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative darkening towards the corners, as a dermoscope's round field of light gives."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot((xx - (w - 1) / 2) / (w / 2), (yy - (h - 1) / 2) / (h / 2)) / math.sqrt(2.0)
    start = float(rng.uniform(0.72, 0.85))  # 1.0 is a corner, 0.71 the middle of a side
    strength = float(rng.uniform(0.25, 0.55))
    ramp = np.clip((dist - start) / (1.0 - start), 0.0, 1.0)
    return 1.0 - strength * ramp * ramp


def _ellipse_radius(phi: np.ndarray, a: float, b: float) -> np.ndarray:
    return a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)


def _radial_outline(rng: np.random.Generator, cx: float, cy: float, a: float, b: float, angle: float,
                    harmonics: range, amplitude: float, n_points: int = 360) -> np.ndarray:
    """Closed outline around (cx, cy): an ellipse whose radius is perturbed by random harmonics."""
    phi = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    wobble = np.zeros_like(phi)
    for k in harmonics:
        # 1/k fall-off keeps the outline continuous while high harmonics make it ragged.
        coef = rng.normal(0.0, amplitude / k**0.75, 2)
        wobble += coef[0] * np.cos(k * phi) + coef[1] * np.sin(k * phi)
    radius = _ellipse_radius(phi, a, b) * np.clip(1.0 + wobble, 0.4, 1.8)
    x = cx + radius * np.cos(phi + angle)
    y = cy + radius * np.sin(phi + angle)
    return np.stack([x, y], axis=1)


def _fill(mask: np.ndarray, outline: np.ndarray) -> None:
    # Sub-pixel vertices (shift=4) so small lesions keep their shape.
    pts = np.round(outline * 16).astype(np.int32)[None]
    cv2.fillPoly(mask, pts, 255, lineType=cv2.LINE_8, shift=4)


def _lesion_shape(rng: np.random.Generator, h: int, w: int, malignant: bool,
                  lesion_scale: float) -> tuple[np.ndarray, float, float, float]:
    """Binary lesion mask (uint8 0/255) and its centre and main radius."""
    side = min(h, w)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * side
    cy = h / 2 + rng.uniform(-0.08, 0.08) * side
    a = 0.5 * lesion_scale * side
    angle = float(rng.uniform(0.0, np.pi))
    mask = np.zeros((h, w), np.uint8)
    if not malignant:
        b = a * float(rng.uniform(0.7, 1.0))
        _fill(mask, _radial_outline(rng, cx, cy, a, b, angle, range(2, 4), 0.025))
        return mask, cx, cy, a
    # Malignant: a ragged main body plus 1-3 lobes pushed towards one side (asymmetry).
    a_main = 0.8 * a
    b = a_main * float(rng.uniform(0.6, 0.95))
    _fill(mask, _radial_outline(rng, cx, cy, a_main, b, angle, range(1, 15), 0.10))
    side_dir = float(rng.uniform(0.0, 2.0 * np.pi))
    for _ in range(int(rng.integers(1, 4))):
        direction = side_dir + rng.normal(0.0, 0.9)
        dist = a_main * float(rng.uniform(0.45, 0.75))
        lobe = a_main * float(rng.uniform(0.3, 0.55))
        lx, ly = cx + dist * np.cos(direction), cy + dist * np.sin(direction)
        _fill(mask, _radial_outline(rng, lx, ly, lobe, lobe * float(rng.uniform(0.6, 1.0)),
                                    float(rng.uniform(0.0, np.pi)), range(2, 9), 0.08))
    return mask, cx, cy, a


def _pigment_network(rng: np.random.Generator, h: int, w: int, period: float) -> np.ndarray:
    """A reticular pattern in 0..1: thin bright ridges where band-passed noise crosses zero."""
    band = _blurred_noise(rng, h, w, period / 3.0) - 0.5 * _blurred_noise(rng, h, w, period)
    return np.exp(-(band / 0.35) ** 2)


def _pigment_densities(rng: np.random.Generator, mask: np.ndarray, cx: float, cy: float, radius: float,
                       malignant: bool) -> np.ndarray:
    """Per-pixel optical density (H, W, 3) of the lesion's pigment; zero outside the lesion."""
    h, w = mask.shape
    scale = min(h, w) / 256.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rr = np.hypot(xx - cx, yy - cy) / max(radius, 1.0)
    inside = mask.astype(np.float32) / 255.0
    # Benign lesions fade softly into the skin; melanomas often stop more abruptly.
    edge_sigma = max(0.8, (0.025 if malignant else 0.06) * radius)
    alpha = cv2.GaussianBlur(inside, (0, 0), edge_sigma)
    alpha = np.clip(alpha * 1.15, 0.0, 1.0)
    network = _pigment_network(rng, h, w, max(3.0, 7.0 * scale))
    if not malignant:
        # One brown, slightly darker in the middle, with a faint regular network.
        density = float(rng.uniform(0.8, 1.25)) * (1.0 - 0.2 * np.clip(rr, 0.0, 1.0) ** 2)
        density = density * (1.0 + 0.05 * _blurred_noise(rng, h, w, 3.0 * scale) + 0.10 * network)
        return (density * alpha)[..., None] * OD_BROWN[None, None, :]
    base_od = OD_DARK_BROWN if rng.random() < 0.5 else OD_BROWN
    density = float(rng.uniform(0.9, 1.3)) * (1.0 + 0.18 * _blurred_noise(rng, h, w, 6.0 * scale)
                                              + 0.25 * network)
    od = density[..., None] * base_od[None, None, :]
    # 1-3 more colours as blotches placed off-centre, so colours are unevenly distributed.
    n_extra = int(rng.integers(1, 4))
    for idx in rng.choice(len(MALIGNANT_EXTRA_ODS), n_extra, replace=False):
        extra = MALIGNANT_EXTRA_ODS[int(idx)]
        if extra is base_od:
            extra = OD_BLACK
        blob = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            direction = rng.uniform(0.0, 2.0 * np.pi)
            dist = radius * float(rng.uniform(0.0, 0.6))
            bx, by = cx + dist * np.cos(direction), cy + dist * np.sin(direction)
            axes = (max(1, int(radius * rng.uniform(0.15, 0.45))), max(1, int(radius * rng.uniform(0.1, 0.35))))
            cv2.ellipse(blob, (int(bx), int(by)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), max(1.0, 0.12 * radius))
        blob = np.clip(blob * (1.0 + 0.3 * _blurred_noise(rng, h, w, 2.5 * scale)), 0.0, 1.0)
        od = od * (1.0 - blob[..., None]) + blob[..., None] * extra[None, None, :] * float(rng.uniform(0.9, 1.2))
    return od * alpha[..., None]


def _bezier(p: np.ndarray, n: int = 48) -> np.ndarray:
    """Points on a cubic Bezier curve with control points ``p`` (4, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3])


def draw_hair(image: np.ndarray, rng: np.random.Generator,
              n_hairs: tuple[int, int] = (5, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Draw thin dark curved hairs over an RGB uint8 image.

    Args:
        image: RGB uint8 image (H, W, 3); not modified.
        rng: random generator (the only source of randomness).
        n_hairs: inclusive range for the number of strands.

    Returns:
        (hairy image, RGB uint8; hair mask, uint8 0/255 with the strands' pixels).
    """
    h, w = image.shape[:2]
    side = min(h, w)
    n = int(rng.integers(n_hairs[0], n_hairs[1] + 1))
    # One hair colour per person, nearly black with a brown cast; strands vary a little.
    person = np.array([38.0, 28.0, 22.0], np.float32) * float(rng.uniform(0.5, 1.3))
    layers = np.zeros((h, w, 3), np.float32)
    coverage = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(n):
        # Each strand passes through the inner part of the image, so every hair is visible.
        middle = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
        direction = rng.uniform(0.0, 2.0 * np.pi)
        length = side * float(rng.uniform(0.4, 1.2))
        along = np.array([np.cos(direction), np.sin(direction)])
        normal = np.array([-along[1], along[0]])
        start, end = middle - 0.5 * length * along, middle + 0.5 * length * along
        bend = length * rng.normal(0.0, 0.15, 2)  # hairs curve gently, sometimes in an S
        c1 = start + (end - start) / 3 + bend[0] * normal
        c2 = start + 2 * (end - start) / 3 + bend[1] * normal
        curve = _bezier(np.stack([start, c1, c2, end]))
        width = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
        strand = np.zeros((h, w), np.uint8)
        # OpenCV's thickness 2 draws 3 px; a 2 px hair is two 1 px lines side by side.
        offsets, thickness = ([0.0], 1) if width == 1 else ([-0.5, 0.5], 1) if width == 2 else ([0.0], 2)
        for offset in offsets:
            pts = np.round((curve + offset * normal) * 16).astype(np.int32)[None]
            cv2.polylines(strand, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=4)
        weight = strand.astype(np.float32) / 255.0
        colour = person * float(rng.uniform(0.8, 1.2))
        layers += weight[..., None] * colour[None, None, :]
        coverage += weight
        mask[strand >= 128] = 255
    opacity = np.clip(coverage, 0.0, 1.0)
    hair_colour = layers / np.maximum(coverage, 1e-6)[..., None]
    opacity = opacity * 0.92  # hairs let a little skin show through
    out = image.astype(np.float32) * (1.0 - opacity[..., None]) + hair_colour * opacity[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def _draw_image(rng: np.random.Generator, h: int, w: int, malignant: bool, skin_tone: int, hair: bool,
                lesion_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    if skin_tone not in SKIN_RGB:
        raise ValueError(f"skin_tone must be 0..{len(SKIN_RGB) - 1}, got {skin_tone}")
    if lesion_scale is None:
        # Melanomas tend to be larger; both stay within 10-45% of the image side.
        lesion_scale = float(rng.uniform(0.2, 0.45) if malignant else rng.uniform(0.1, 0.35))
    if not 0.0 < lesion_scale <= 1.0:
        raise ValueError(f"lesion_scale must be in (0, 1], got {lesion_scale}")
    skin = _make_skin(rng, h, w, skin_tone)
    mask, cx, cy, radius = _lesion_shape(rng, h, w, malignant, lesion_scale)
    od = _pigment_densities(rng, mask, cx, cy, radius, malignant)
    img = skin * np.exp(-od)
    if hair:
        hairy, _ = draw_hair(np.clip(np.round(img), 0, 255).astype(np.uint8), rng)
        img = hairy.astype(np.float32)
    img = img * _vignette(rng, h, w)[..., None]
    # A soft camera: slight blur, then a touch of sensor noise.
    img = cv2.GaussianBlur(img, (0, 0), 0.6 * max(1.0, min(h, w) / 256.0))
    img = img + rng.normal(0.0, 1.2, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def make_lesion_image(rng: np.random.Generator, size: int = 256, malignant: bool = False, skin_tone: int = 2,
                      hair: bool = False, lesion_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one dermoscopy-like image of skin with one lesion.

    Args:
        rng: random generator (the only source of randomness).
        size: image side in pixels.
        malignant: irregular, multi-coloured, asymmetric lesion instead of a smooth uniform brown one.
        skin_tone: index into kmel.constants.SKIN_TONE_GROUPS (base colours in SKIN_RGB).
        hair: draw hairs over skin and lesion (see draw_hair).
        lesion_scale: lesion diameter as a fraction of the side; random (10-45%) when None.

    Returns:
        (RGB uint8 image (size, size, 3), lesion mask uint8 0/255 (size, size)).
    """
    return _draw_image(rng, size, size, malignant, skin_tone, hair, lesion_scale)


# ---------------------------------------------------------------------------------------------
# Data folders
# ---------------------------------------------------------------------------------------------
def _tone_counts(n: int) -> list[int]:
    """Images per skin-tone group: weighted, every group with at least 5% (when n allows)."""
    floor = math.ceil(MIN_TONE_FRACTION * n) if n >= len(SKIN_TONE_WEIGHTS) else 0
    ideal = [w * n for w in SKIN_TONE_WEIGHTS]
    counts = [max(floor, int(x)) for x in ideal]
    while sum(counts) > n:  # take from the group furthest above its ideal share
        i = max((j for j in range(len(counts)) if counts[j] > floor), key=lambda j: counts[j] - ideal[j])
        counts[i] -= 1
    while sum(counts) < n:  # give to the group furthest below it
        i = max(range(len(counts)), key=lambda j: ideal[j] - counts[j])
        counts[i] += 1
    return counts


def _flags(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Exactly round(fraction * n) True values in random order."""
    k = int(round(fraction * n))
    return rng.permutation(np.arange(n) < k)


def _plan(rng: np.random.Generator, n: int, malignant_fraction: float,
          hair_fraction: float) -> dict[str, np.ndarray]:
    tones = rng.permutation(np.repeat(np.arange(len(SKIN_TONE_WEIGHTS)), _tone_counts(n)))
    return {
        "skin_tone": tones,
        "malignant": _flags(rng, n, malignant_fraction),
        "hair": _flags(rng, n, hair_fraction),
        "landscape": _flags(rng, n, LANDSCAPE_FRACTION),
    }


def _write_image(path: Path, image: np.ndarray) -> None:
    ok = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"could not write {path}")


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _render(seed: int, index: int, size: int, malignant: bool, skin_tone: int, hair: bool,
            landscape: bool) -> tuple[np.ndarray, np.ndarray]:
    # One generator per image: an image's pixels do not depend on how many others were drawn.
    rng = np.random.default_rng([seed, 1, index])
    height = int(size * LANDSCAPE_RATIO) if landscape else size
    return _draw_image(rng, height, size, malignant, skin_tone, hair, None)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def make_synthetic_dataset(out_dir: Path, n_images: int = 120, seed: int = 0, size: int = 256,
                           malignant_fraction: float = 0.3, hair_fraction: float = 0.3,
                           n_patients: int | None = None) -> dict:
    """Write a data folder laid out like an ISIC 2019 + 2020 download, with images and masks.

    Layout: the official 2019 ground-truth and metadata CSVs and the 2020 v2 ground truth (real
    headers), ``images/2019/`` and ``images/2020/`` JPEGs (quality 95), ``masks/<id>_segmentation.png``
    (0/255), and ``synthetic_truth.csv`` (``image_id,skin_tone,malignant,hair``) for tests. Ids are
    ``ISIC_9000000`` upwards; 2020 images belong to patients with several images each. About 30%
    of the images are landscape (side × 0.75 high). The same seed gives the same bytes.

    Args:
        out_dir: folder to write (created if missing).
        n_images: images in total, split about half and half between 2019 and 2020.
        seed: random seed.
        size: image width in pixels (and height of square images).
        malignant_fraction: share of malignant images in each year.
        hair_fraction: share of images with hair.
        n_patients: 2020 patients (default: a third of the 2020 images).

    Returns:
        Summary counts: per year, malignant, per skin tone, with hair, patients.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    _check_fraction("malignant_fraction", malignant_fraction)
    _check_fraction("hair_fraction", hair_fraction)
    out_dir = Path(out_dir)
    n_2020 = n_images // 2
    n_2019 = n_images - n_2020
    if n_2020 and n_patients is None:
        n_patients = max(1, n_2020 // 3)
    n_patients = int(min(max(n_patients or 0, 1 if n_2020 else 0), n_2020))

    rng = np.random.default_rng([seed, 0])
    plan = _plan(rng, n_images, malignant_fraction, hair_fraction)
    # Malignancy is drawn per year so both years get their share even in tiny folders.
    plan["malignant"] = np.concatenate([_flags(rng, n_2019, malignant_fraction),
                                        _flags(rng, n_2020, malignant_fraction)])
    years = np.array([2019] * n_2019 + [2020] * n_2020)
    ids = [f"ISIC_{FIRST_ID + i:07d}" for i in range(n_images)]
    patients = rng.permutation(np.arange(n_2020) % max(n_patients, 1))
    ages = rng.choice(np.arange(20, 90, 5), n_images) + np.where(plan["malignant"], 10, 0)
    ages = np.minimum(ages, 85)
    sexes = rng.choice(["female", "male"], n_images)
    site_draw = rng.random(n_images)
    label_draw = rng.random(n_images)

    for sub in ("images/2019", "images/2020", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    gt19, meta19, gt20, truth = [], [], [], []
    for i, image_id in enumerate(ids):
        malignant, tone, hair = bool(plan["malignant"][i]), int(plan["skin_tone"][i]), bool(plan["hair"][i])
        image, mask = _render(seed, i, size, malignant, tone, hair, bool(plan["landscape"][i]))
        year = int(years[i])
        _write_image(out_dir / "images" / str(year) / f"{image_id}.jpg", image)
        cv2.imwrite(str(out_dir / "masks" / f"{image_id}_segmentation.png"), mask)
        age, sex = int(ages[i]), str(sexes[i])
        if year == 2019:
            if malignant:
                dx = "MEL" if label_draw[i] < 0.8 else "BCC"
            else:
                dx = "NV" if label_draw[i] < 0.7 else "BKL"
            gt19.append([image_id] + ["1.0" if c == dx else "0.0" for c in GT_2019_COLUMNS[1:]])
            # Real 2019 metadata leaves some sites and lesion ids blank.
            site = SITES_2019[int(site_draw[i] / 0.9 * len(SITES_2019))] if site_draw[i] < 0.9 else ""
            lesion = f"BCN_{FIRST_LESION_ID + i:07d}" if i % 2 == 0 else ""
            meta19.append([image_id, age, site, lesion, sex])
        else:
            if malignant:
                diagnosis = "melanoma"
            else:
                diagnosis = "nevus" if label_draw[i] < 0.4 else "unknown"
            patient = f"IP_{FIRST_PATIENT_ID + int(patients[i - n_2019]):07d}"
            site = SITES_2020[int(site_draw[i] * len(SITES_2020))]
            gt20.append([image_id, patient, f"IL_{FIRST_LESION_ID + i:07d}", sex, age, site, diagnosis,
                         "malignant" if malignant else "benign", int(malignant)])
        truth.append([image_id, tone, int(malignant), int(hair)])

    _write_csv(out_dir / GT_2019_CSV, GT_2019_COLUMNS, gt19)
    _write_csv(out_dir / META_2019_CSV, META_2019_COLUMNS, meta19)
    _write_csv(out_dir / GT_2020_CSV, GT_2020_COLUMNS, gt20)
    _write_csv(out_dir / TRUTH_CSV, ("image_id", "skin_tone", "malignant", "hair"), truth)
    return {
        "n_images": n_images,
        "per_year": {"2019": n_2019, "2020": n_2020},
        "malignant": int(plan["malignant"].sum()),
        "malignant_per_year": {"2019": int(plan["malignant"][:n_2019].sum()),
                               "2020": int(plan["malignant"][n_2019:].sum())},
        "per_skin_tone": {name: int((plan["skin_tone"] == k).sum()) for k, name in enumerate(SKIN_TONE_GROUPS)},
        "hair": int(plan["hair"].sum()),
        "landscape": int(plan["landscape"].sum()),
        "n_patients": n_patients,
    }


def make_prediction_folder(out_dir: Path, n_images: int = 12, seed: int = 1, size: int = 256) -> pd.DataFrame:
    """Write a flat folder of held-out JPEGs (ids from ISIC_9900000) and ``truth.csv`` (image,target).

    Half the images are malignant, 30% have hair, every skin-tone group appears (when n_images >= 5).

    Returns:
        The truth table: columns ``image`` (id, no extension) and ``target`` (0/1).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    plan = _plan(rng, n_images, 0.5, 0.3)
    rows = []
    for i in range(n_images):
        image_id = f"ISIC_{FIRST_PREDICT_ID + i:07d}"
        image, _ = _render(seed, FIRST_PREDICT_ID + i, size, bool(plan["malignant"][i]),
                           int(plan["skin_tone"][i]), bool(plan["hair"][i]), bool(plan["landscape"][i]))
        _write_image(out_dir / f"{image_id}.jpg", image)
        rows.append({"image": image_id, "target": int(plan["malignant"][i])})
    truth = pd.DataFrame(rows, columns=["image", "target"])
    truth.to_csv(out_dir / "truth.csv", index=False)
    # Marks the folder as kmel's: build-records never reads held-out labels (make-synthetic puts this
    # folder inside the data folder) as training data.
    import json

    import kmel
    from kmel.constants import MANIFEST

    (out_dir / MANIFEST).write_text(json.dumps({
        "kmel_version": kmel.__version__, "contents": "held-out images for predict; truth.csv holds their labels"}))
    return truth
