"""An ISIC-shaped data folder of synthetic dermoscopy-like images (drawn by kmel.data.synthetic_images) for the demo and the core tests.

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

from kmel.constants import SKIN_TONE_GROUPS
from kmel.data.synthetic_images import draw_image

# Lighter tones are more common, as in the ISIC archive; every group keeps at least 5%.
SKIN_TONE_WEIGHTS = (0.32, 0.26, 0.18, 0.12, 0.12)
MIN_TONE_FRACTION = 0.05


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
    return draw_image(rng, height, size, malignant, skin_tone, hair, None)


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
