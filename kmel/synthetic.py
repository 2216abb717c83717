"""Synthetic ISIC-format data for the demo and the tests (NumPy / OpenCV only).

Images are skin of one of five tones with shading, texture and a dark dermoscope vignette, and one
lesion: benign ones round and uniformly brown, malignant ones irregular, asymmetric and
multi-coloured (so a model can learn the difference from pixels), optionally with hair. The folder
is laid out like a real download, with the official 2019 and 2020 CSV headers (patient ids in
2020), so ``build-records`` reads it as it reads the archives. Same seed, same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

# sRGB base skin colours per tone group (0 very_light … 4 dark). Mean brightness lands in the
# reference's groups (>192, 160-192, 128-160, 96-128, <96) and ITA in the matching category.
SKIN_RGB: dict[int, tuple[int, int, int]] = {
    0: (236, 214, 200),
    1: (214, 170, 146),
    2: (194, 146, 122),
    3: (160, 106, 76),
    4: (100, 66, 48),
}
TONE_WEIGHTS = (0.30, 0.28, 0.20, 0.12, 0.10)  # lighter tones more common, as in the archives
HEADER_2019 = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
HEADER_2019_META = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
HEADER_2020 = ["image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge",
               "diagnosis", "benign_malignant", "target"]
SITES = ["anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck"]


def _skin(rng: np.random.Generator, h: int, w: int, tone: int) -> np.ndarray:
    base = np.array(SKIN_RGB[tone], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # low-frequency shading
    shade = 1 + 0.05 * np.sin(xx / w * math.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6)) \
        + 0.04 * np.cos(yy / h * math.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5) * 4.0
    image = base[None, None, :] * shade[..., None] + texture[..., None]
    # dermoscope vignette: dark corners outside a large circle
    r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    vignette = np.clip(1.0 - 0.8 * np.clip(r - 1.05, 0, None) / 0.35, 0.2, 1.0)
    return image * vignette[..., None]


def _blob(rng: np.random.Generator, h: int, w: int, malignant: bool, scale: float) -> np.ndarray:
    """Lesion mask: a smooth ellipse (benign) or an irregular, lobed outline (malignant)."""
    cx = w / 2 + rng.uniform(-0.1, 0.1) * w
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    radius = scale * min(h, w) / 2
    aspect = rng.uniform(0.75, 1.0)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 2 * math.pi, 180, endpoint=False)
    rad = np.ones_like(t)
    if malignant:
        for k in range(2, 7):
            rad += rng.uniform(0.06, 0.16) * np.sin(k * t + rng.uniform(0, 2 * math.pi))
        rad += 0.05 * rng.normal(0, 1, t.size).cumsum() / np.sqrt(t.size)
    else:
        rad += 0.03 * np.sin(2 * t + rng.uniform(0, 2 * math.pi))
    x = radius * rad * np.cos(t)
    y = radius * rad * aspect * np.sin(t)
    xr = cx + x * math.cos(angle) - y * math.sin(angle)
    yr = cy + x * math.sin(angle) + y * math.cos(angle)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.stack([xr, yr], 1).round().astype(np.int32)], 1)
    return mask


def _paint_lesion(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, malignant: bool) -> np.ndarray:
    h, w = mask.shape
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(1.0, min(h, w) / 120))
    if not malignant:
        skin = np.median(image[mask == 0], axis=0) if (mask == 0).any() else np.array([180, 130, 100], np.float32)
        colour = (skin * rng.uniform(0.45, 0.65) * np.array([1.0, 0.9, 0.8])).astype(np.float32)
        lesion = np.broadcast_to(colour, image.shape).copy()
        lesion += cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2)[..., None] * 3
    else:
        palette = np.array([[70, 40, 25], [25, 20, 20], [90, 100, 125], [150, 60, 55], [110, 70, 40]], np.float32)
        chosen = palette[rng.choice(len(palette), size=rng.integers(2, 5), replace=False)]
        field = cv2.GaussianBlur(rng.uniform(0, 1, (h, w)).astype(np.float32), (0, 0), max(2.0, min(h, w) / 25))
        field = (field - field.min()) / (np.ptp(field) + 1e-6)
        idx = np.minimum((field * len(chosen)).astype(int), len(chosen) - 1)
        lesion = chosen[idx]
        # asymmetric darkening
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        lesion *= (1 + 0.25 * np.tanh((np.cos(a) * (xx - w / 2) + np.sin(a) * (yy - h / 2)) / (0.2 * w)))[..., None]
        # dots / globules
        for _ in range(int(rng.integers(3, 10))):
            ys, xs = np.nonzero(mask)
            if len(ys):
                i = rng.integers(len(ys))
                cv2.circle(lesion, (int(xs[i]), int(ys[i])), max(1, int(min(h, w) / 80)), (20, 15, 15), -1)
    return image * (1 - soft[..., None]) + lesion * soft[..., None]


def draw_hair(
    image: np.ndarray, rng: np.random.Generator, n_hairs: tuple[int, int] = (5, 20)
) -> tuple[np.ndarray, np.ndarray]:
    """Thin dark curved strands across the image; returns (hairy image, hair mask uint8 0/1)."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(n_hairs[0], n_hairs[1] + 1))):
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * [w, h]
        t = np.linspace(0, 1, 60)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        thickness = int(rng.integers(1, 3 if min(h, w) < 200 else 4))
        cv2.polylines(mask, [pts.round().astype(np.int32)], False, 1, thickness, lineType=cv2.LINE_AA)
    colour = np.array([rng.uniform(20, 50)] * 3, np.float32) * [1.0, 0.85, 0.7]
    out = image.astype(np.float32)
    m = mask.astype(np.float32)[..., None]
    out = out * (1 - m) + colour * m
    return np.clip(out, 0, 255).astype(np.uint8), mask


def make_lesion_image(
    rng: np.random.Generator, size: int = 256, malignant: bool = False, skin_tone: int = 2, hair: bool = False,
    lesion_scale: float | None = None, height: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image of skin and a lesion, and its mask (uint8 0/255)."""
    h, w = height or size, size
    scale = lesion_scale if lesion_scale is not None else rng.uniform(0.2, 0.9)
    mask = _blob(rng, h, w, malignant, scale)
    image = _skin(rng, h, w, skin_tone)
    image = _paint_lesion(rng, image, mask, malignant)
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0.6)
    if hair:
        image, _ = draw_hair(image, rng)
    return image, mask * 255


def _ids(start: int, n: int, prefix: str = "ISIC_") -> list[str]:
    return [f"{prefix}{start + i:07d}" for i in range(n)]


def make_synthetic_dataset(
    out_dir: Path, n_images: int = 120, seed: int = 0, size: int = 256, malignant_fraction: float = 0.3,
    hair_fraction: float = 0.3, n_patients: int | None = None,
) -> dict[str, Any]:
    """Write a 2019 + 2020 style data folder (CSVs, images/, masks/); returns a summary."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_2019 = n_images // 2
    n_2020 = n_images - n_2019
    ids = _ids(9_000_000, n_images)
    malignant = rng.uniform(size=n_images) < malignant_fraction
    # every tone present with at least ~5% of images
    tones = rng.choice(5, size=n_images, p=TONE_WEIGHTS)
    tones[: min(5, n_images)] = np.arange(min(5, n_images))
    hair = rng.uniform(size=n_images) < hair_fraction
    (out_dir / "images" / "2019").mkdir(parents=True, exist_ok=True)
    (out_dir / "images" / "2020").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    truth = []
    for i, image_id in enumerate(ids):
        height = size if rng.uniform() < 0.7 else int(size * 0.75)
        image, mask = make_lesion_image(rng, size, bool(malignant[i]), int(tones[i]), bool(hair[i]),
                                        lesion_scale=float(rng.uniform(0.25, 0.8)), height=height)
        year = "2019" if i < n_2019 else "2020"
        cv2.imwrite(str(out_dir / "images" / year / f"{image_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(out_dir / "masks" / f"{image_id}_segmentation.png"), mask)
        truth.append({"image_id": image_id, "skin_tone": int(tones[i]), "malignant": int(malignant[i]),
                      "hair": int(hair[i]), "year": int(year)})

    rows_2019, meta_2019 = [], []
    for i in range(n_2019):
        diag = ("MEL" if rng.uniform() < 0.8 else "BCC") if malignant[i] else ("NV" if rng.uniform() < 0.8 else "BKL")
        rows_2019.append([ids[i]] + [("1.0" if c == diag else "0.0") for c in HEADER_2019[1:]])
        meta_2019.append([ids[i], int(rng.integers(3, 17)) * 5, SITES[rng.integers(len(SITES))], "",
                          "female" if rng.uniform() < 0.5 else "male"])
    pd.DataFrame(rows_2019, columns=HEADER_2019).to_csv(out_dir / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame(meta_2019, columns=HEADER_2019_META).to_csv(out_dir / "ISIC_2019_Training_Metadata.csv", index=False)

    n_patients = n_patients or max(1, n_2020 // 3)
    patients = rng.integers(0, n_patients, size=n_2020)
    rows_2020 = []
    for j in range(n_2020):
        i = n_2019 + j
        diagnosis = "melanoma" if malignant[i] else ("nevus" if rng.uniform() < 0.5 else "unknown")
        rows_2020.append([ids[i], f"IP_{9_000_000 + int(patients[j]):07d}", f"IL_{9_000_000 + j:07d}",
                          "female" if rng.uniform() < 0.5 else "male", int(rng.integers(3, 17)) * 5,
                          SITES[rng.integers(len(SITES))], diagnosis,
                          "malignant" if malignant[i] else "benign", int(malignant[i])])
    pd.DataFrame(rows_2020, columns=HEADER_2020).to_csv(out_dir / "ISIC_2020_Training_GroundTruth_v2.csv",
                                                        index=False)
    pd.DataFrame(truth).to_csv(out_dir / "synthetic_truth.csv", index=False)
    return {
        "images": n_images, "isic2019": n_2019, "isic2020": n_2020, "patients_2020": int(len(set(patients))),
        "malignant": int(malignant.sum()), "with_hair": int(hair.sum()),
        "per_skin_tone": {int(t): int((tones == t).sum()) for t in range(5)},
    }


def make_prediction_folder(out_dir: Path, n_images: int = 12, seed: int = 1, size: int = 256) -> pd.DataFrame:
    """A flat folder of held-out images (ids from ISIC_9900000) and ``truth.csv`` (image,target)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, image_id in enumerate(_ids(9_900_000, n_images)):
        malignant = bool(i % 2)
        tone = int(rng.choice(5, p=TONE_WEIGHTS))
        image, _ = make_lesion_image(rng, size, malignant, tone, bool(rng.uniform() < 0.3),
                                     lesion_scale=float(rng.uniform(0.25, 0.8)))
        cv2.imwrite(str(out_dir / f"{image_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"image": image_id, "target": int(malignant)})
    truth = pd.DataFrame(rows)
    truth.to_csv(out_dir / "truth.csv", index=False)
    return truth
