"""Drawing one synthetic dermoscopy-like image with its lesion mask (and hair, with its own mask).

NumPy + OpenCV only; everything is drawn from an explicit ``numpy.random.Generator`` so a seed gives the
same bytes. The images keep the cues the pipeline relies on: the lesion is darker than the skin, the mask
covers it, malignant lesions have irregular borders and several colours, the skin colour lands in a known
brightness group and ITA category, and hair is drawn with its own mask. :mod:`kmel.data.synthetic` lays
such images out as an ISIC-shaped data folder.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from kmel.constants import ITA_CATEGORIES

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


# === Pigments ===
# Optical densities per RGB channel: a pigmented pixel is skin * exp(-density * od), so pigment
# always darkens whatever skin it sits on, on every tone.
OD_BROWN = np.array([0.55, 0.85, 1.10], np.float32)


OD_DARK_BROWN = np.array([1.05, 1.40, 1.65], np.float32)


OD_BLACK = np.array([2.20, 2.30, 2.30], np.float32)


OD_BLUE_GREY = np.array([0.85, 0.62, 0.36], np.float32)


OD_REDDISH = np.array([0.30, 0.85, 0.85], np.float32)


MALIGNANT_EXTRA_ODS = (OD_BLACK, OD_BLUE_GREY, OD_REDDISH, OD_DARK_BROWN)


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


def draw_image(rng: np.random.Generator, h: int, w: int, malignant: bool, skin_tone: int, hair: bool,
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
    return draw_image(rng, size, size, malignant, skin_tone, hair, lesion_scale)
