"""A synthetic data folder shaped like the ISIC 2024 challenge's (SLICE-3D): ``train-metadata.csv`` and
``train-image.hdf5``.

The real set holds 3D total-body-photography close-up tiles: JPEG crops of about 130 px, one scalar HDF5
dataset of fixed-length bytes (dtype ``S<n>``) per ``isic_id``, and a 55-column table (patient, lesion, the
TBP lesion visualiser's ``tbp_lv_*`` measurements, the hierarchical diagnosis ``iddx_*``), about 0.1%
malignant. Here the crops show the project's own synthetic lesions
(:func:`kmel.data.synthetic_images.draw_image`: malignant ones look like kmel's other malignant synthetic
lesions), each patient has many lesions and one skin tone, and malignant rows' measurements are shifted a
little (larger, more colour variation, lower nevus confidence) so a metadata model has something to learn.

Drawing a lesion takes about 10 ms, so crops come from a pool of at most 1,000 benign and 250 malignant
base lesions (split over the skin tones); every crop is a shifted, rotated, flipped, rescaled and
brightness-jittered copy of its base, re-encoded, and no two crops have the same bytes. Smaller sets get
a fresh lesion per crop. Each crop is written as soon as it is made: what grows with ``n_images`` is the
table and a 16-byte digest per crop, never the images. NumPy, OpenCV, h5py and pandas only; the same seed
gives the same bytes.

Speed, measured on the project's 2-core machine under ``nice -n 19`` beside a running training (so an upper
bound): ``python bench/records_hdf5.py --n 50000 --generate-only`` wrote 50,000 crops in 609 s (82 crops/s;
train-image.hdf5 204 MiB); 5,000 crops in 14.2 s (352 crops/s) — most of the small run is drawing the ~1,050 base
lesions (~9 ms each), a crop from the pool costs ~1.3 ms alone.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kmel.data.synthetic_images import draw_image

# === Data folder layout ===
METADATA_CSV = "train-metadata.csv"
IMAGES_HDF5 = "train-image.hdf5"
TBP_LV_COLUMNS = (
    "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext",
    "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean",
    "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm",
    "tbp_lv_eccentricity", "tbp_lv_location", "tbp_lv_location_simple", "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis",
    "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z",
)
IDDX_COLUMNS = ("iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5")
METADATA_COLUMNS = (
    "isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general", "clin_size_long_diam_mm",
    "image_type", "tbp_tile_type", *TBP_LV_COLUMNS, "attribution", "copyright_license", "lesion_id",
    "iddx_full", *IDDX_COLUMNS, "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)
FIRST_ID = 9_500_000  # far above real ISIC ids (and kmel's other synthetic ids, 9_000_000 and 9_900_000)
FIRST_PATIENT_ID = 9_500_000
FIRST_LESION_ID = 9_500_000

# === Population ===
IMAGES_PER_PATIENT = 20
TONE_WEIGHTS = (0.40, 0.30, 0.15, 0.10, 0.05)  # kmel.constants.SKIN_TONE_GROUPS; TBP cohorts are mostly fair
XP_FRACTION = 0.7  # share of patients photographed with cross-polarised light ("3D: XP")
MISSING_FRACTION = 0.02  # patients without age or sex, as in the real table
ATTRIBUTIONS = (
    ("Memorial Sloan Kettering Cancer Center", 0.35),
    ("Department of Dermatology, Hospital Clínic de Barcelona", 0.2),
    ("University Hospital of Basel", 0.12),
    ("Frazer Institute, The University of Queensland, Dermatology Research Centre", 0.12),
    ("ACEMID MIA", 0.08),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", 0.08),
    ("FNQH Cairns", 0.05),
)
# (tbp_lv_location, tbp_lv_location_simple, anatom_site_general, weight, body x, y, z in mm)
LOCATIONS = (
    ("Torso Back Top Third", "Torso Back", "posterior torso", 0.16, 0, 1400, -120),
    ("Torso Back Middle Third", "Torso Back", "posterior torso", 0.10, 0, 1200, -120),
    ("Torso Back Bottom Third", "Torso Back", "posterior torso", 0.06, 0, 1050, -110),
    ("Torso Front Top Half", "Torso Front", "anterior torso", 0.10, 0, 1350, 110),
    ("Torso Front Bottom Half", "Torso Front", "anterior torso", 0.06, 0, 1100, 110),
    ("Left Leg - Upper", "Left Leg", "lower extremity", 0.07, 110, 750, 0),
    ("Left Leg - Lower", "Left Leg", "lower extremity", 0.06, 110, 300, 0),
    ("Right Leg - Upper", "Right Leg", "lower extremity", 0.07, -110, 750, 0),
    ("Right Leg - Lower", "Right Leg", "lower extremity", 0.06, -110, 300, 0),
    ("Left Arm - Upper", "Left Arm", "upper extremity", 0.05, 230, 1300, 0),
    ("Left Arm - Lower", "Left Arm", "upper extremity", 0.04, 280, 1000, 0),
    ("Right Arm - Upper", "Right Arm", "upper extremity", 0.05, -230, 1300, 0),
    ("Right Arm - Lower", "Right Arm", "upper extremity", 0.04, -280, 1000, 0),
    ("Head & Neck", "Head & Neck", "head/neck", 0.05, 0, 1600, 0),
    ("Unknown", "Unknown", "", 0.03, 0, 1000, 0),
)

# === Diagnoses (iddx_1 :: iddx_2 :: ...), with weights ===
BENIGN_DETAILED_FRACTION = 0.07  # the rest are plain "Benign", without a lesion id
BENIGN_DETAILED = (
    (("Benign", "Benign melanocytic proliferations", "Nevus"), 0.45),
    (("Benign", "Benign melanocytic proliferations", "Nevus", "Nevus, Atypical, Dysplastic, or Clark"), 0.1),
    (("Benign", "Benign epidermal proliferations", "Seborrheic keratosis"), 0.2),
    (("Benign", "Benign epidermal proliferations", "Lichen planus like keratosis"), 0.08),
    (("Benign", "Flat melanotic pigmentations - not melanocytic nevus", "Solar lentigo"), 0.1),
    (("Benign", "Benign soft tissue proliferations - Fibro-histiocytic", "Dermatofibroma"), 0.07),
)
MELANOMA = "Malignant melanocytic proliferations (Melanoma)"
BCC = "Malignant adnexal epithelial proliferations - Follicular"
MALIGNANT = (
    (("Malignant", MELANOMA, "Melanoma Invasive"), 0.17),
    (("Malignant", MELANOMA, "Melanoma Invasive", "Melanoma Invasive, Superficial spreading"), 0.06),
    (("Malignant", MELANOMA, "Melanoma Invasive", "Melanoma Invasive, Superficial spreading",
      "Melanoma Invasive, Associated with a nevus"), 0.02),
    (("Malignant", MELANOMA, "Melanoma in situ"), 0.12),
    (("Malignant", MELANOMA, "Melanoma in situ", "Melanoma in situ, Lentigo maligna type"), 0.05),
    (("Malignant", BCC, "Basal cell carcinoma"), 0.25),
    (("Malignant", BCC, "Basal cell carcinoma", "Basal cell carcinoma, Nodular"), 0.08),
    (("Malignant", "Malignant epidermal proliferations", "Squamous cell carcinoma in situ"), 0.15),
    (("Malignant", "Malignant epidermal proliferations", "Squamous cell carcinoma, Invasive"), 0.10),
)
MITOTIC_INDEX = ("0/mm^2", "<1/mm^2", "1/mm^2", "2/mm^2", "3/mm^2", "4/mm^2", ">4/mm^2")

# === Images ===
POOL_SIZE = {False: 1000, True: 250}  # base lesions per class, split over the skin tones
HAIR_FRACTION = 0.2
BASE_MARGIN = 1.15  # bases are drawn this much larger than a crop, which is cut from them with a shift
BASE_JPEG_QUALITY = 97


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def n_malignant(n_images: int, malignant_fraction: float) -> int:
    """Malignant rows: about ``malignant_fraction`` of them and, unless it is 0, at least 1 from 20 rows and 2
    from 50 (so that small folders still hold both classes)."""
    k = int(round(malignant_fraction * n_images))
    if malignant_fraction > 0:
        k = max(k, 1 if n_images >= 20 else 0, 2 if n_images >= 50 else 0)
    return min(k, n_images)


def _patients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Patient index per row: every patient has a lesion, the rest go by skewed (log-normal) weights."""
    n_patients = max(1, n // IMAGES_PER_PATIENT)
    weights = rng.lognormal(0.0, 1.0, n_patients)
    extra = rng.choice(n_patients, n - n_patients, p=weights / weights.sum()) if n > n_patients else []
    return rng.permutation(np.concatenate([np.arange(min(n, n_patients)), extra]).astype(int))


def _pick(rng: np.random.Generator, table: tuple, n: int) -> list:
    weights = np.array([w for _, w in table], float)
    return [table[i][0] for i in rng.choice(len(table), n, p=weights / weights.sum())]


def _diagnoses(rng: np.random.Generator, malignant: np.ndarray) -> list[tuple[str, ...]]:
    n = len(malignant)
    detailed = rng.random(n) < BENIGN_DETAILED_FRACTION
    benign, bad = _pick(rng, BENIGN_DETAILED, n), _pick(rng, MALIGNANT, n)
    return [bad[i] if malignant[i] else benign[i] if detailed[i] else ("Benign",) for i in range(n)]


def _measurements(rng: np.random.Generator, m: np.ndarray) -> dict[str, np.ndarray]:
    """The numeric ``tbp_lv_*`` columns (and the clinical size), malignant rows (``m`` 1) shifted."""
    n = len(m)
    long_mm = np.clip(rng.lognormal(np.log(3.2) + 0.45 * m, 0.35, n), 1.0, 30.0)
    minor = long_mm * rng.uniform(0.55, 0.95, n) * (1 - 0.05 * m)
    area = math.pi / 4 * long_mm * minor * rng.uniform(0.85, 1.0, n)
    a, b = long_mm / 2, minor / 2  # Ramanujan's ellipse perimeter, made ragged for melanomas
    ellipse = math.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    perimeter = ellipse * (1 + np.abs(rng.normal(0, 0.08, n)) + 0.15 * m)
    lab = {"L": rng.normal(45, 9, n) - 6 * m, "A": rng.normal(20, 5, n) + 2 * m, "B": rng.normal(28, 5, n)}
    ext = {"L": lab["L"] + rng.normal(10, 4, n) + 4 * m, "A": lab["A"] - rng.normal(3, 2, n),
           "B": lab["B"] - rng.normal(1.5, 2, n)}
    delta = {k: lab[k] - ext[k] for k in lab}
    delta_lb = np.sqrt(delta["L"] ** 2 + delta["A"] ** 2 + delta["B"] ** 2)
    color_std = rng.gamma(2.0, 0.4, n) + 1.2 * m * rng.uniform(0.5, 1.5, n)
    out = {
        "clin_size_long_diam_mm": np.round(long_mm, 2),
        "tbp_lv_A": lab["A"], "tbp_lv_Aext": ext["A"], "tbp_lv_B": lab["B"], "tbp_lv_Bext": ext["B"],
        "tbp_lv_C": np.hypot(lab["A"], lab["B"]), "tbp_lv_Cext": np.hypot(ext["A"], ext["B"]),
        "tbp_lv_H": np.degrees(np.arctan2(lab["B"], lab["A"])),
        "tbp_lv_Hext": np.degrees(np.arctan2(ext["B"], ext["A"])),
        "tbp_lv_L": lab["L"], "tbp_lv_Lext": ext["L"],
        "tbp_lv_areaMM2": area, "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_color_std_mean": color_std,
        "tbp_lv_deltaA": delta["A"], "tbp_lv_deltaB": delta["B"], "tbp_lv_deltaL": delta["L"],
        "tbp_lv_deltaLB": delta_lb, "tbp_lv_deltaLBnorm": delta_lb * rng.uniform(0.85, 1.15, n),
        "tbp_lv_eccentricity": np.sqrt(1 - (minor / long_mm) ** 2),
        "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": 100 * np.where(m, rng.beta(0.3, 1.5, n), rng.beta(0.6, 0.6, n)),
        "tbp_lv_norm_border": np.clip(rng.normal(4.0 + 2.0 * m, 1.5, n), 0, 10),
        "tbp_lv_norm_color": np.clip(rng.gamma(2.0, 1.0, n) + 2.0 * m, 0, 10),
        "tbp_lv_perimeterMM": perimeter,
        "tbp_lv_radial_color_std_max": 0.4 * color_std + rng.gamma(1.5, 0.3, n),
        "tbp_lv_stdL": rng.gamma(2.0, 0.6, n) + 0.6 * m, "tbp_lv_stdLExt": rng.uniform(1.0, 4.0, n),
        "tbp_lv_symm_2axis": np.clip(rng.beta(2, 4, n) + 0.1 * m, 0, 1),
        "tbp_lv_symm_2axis_angle": 5 * rng.integers(0, 36, n),
        "tbp_lv_dnn_lesion_confidence": 100 - 100 * rng.beta(0.3, 6.0, n),
    }
    return {k: v if k == "tbp_lv_symm_2axis_angle" else np.round(v, 6) for k, v in out.items()}


def make_isic2024_metadata(n_images: int, seed: int = 0, malignant_fraction: float = 0.01) -> pd.DataFrame:
    """The ``train-metadata.csv`` table of :func:`make_isic2024_dataset` (no images): METADATA_COLUMNS in
    order, one row per crop in isic_id order."""
    rng = np.random.default_rng([seed, 0])
    n = n_images
    malignant = np.zeros(n, bool)
    malignant[rng.choice(n, n_malignant(n, malignant_fraction), replace=False)] = True
    m = malignant.astype(float)
    patient = _patients(rng, n)
    n_patients = int(patient.max()) + 1
    ages = pd.array(5 * rng.integers(6, 18, n_patients), dtype="Int64")
    ages[rng.random(n_patients) < MISSING_FRACTION] = pd.NA
    sexes = np.where(rng.random(n_patients) < 0.5, "female", "male").astype(object)
    sexes[rng.random(n_patients) < MISSING_FRACTION] = None
    names = [name for name, _ in ATTRIBUTIONS]
    clinic_weights = np.array([w for _, w in ATTRIBUTIONS])
    clinics = rng.choice(len(names), n_patients, p=clinic_weights / clinic_weights.sum())
    tiles = np.where(rng.random(n_patients) < XP_FRACTION, "3D: XP", "3D: white")

    loc_weights = np.array([row[3] for row in LOCATIONS], float)
    loc = rng.choice(len(LOCATIONS), n, p=loc_weights / loc_weights.sum())
    body = np.array([row[4:] for row in LOCATIONS], float)[loc] + rng.normal(0, [60, 120, 30], (n, 3))
    diagnoses = _diagnoses(rng, malignant)
    lesion_next = iter(range(FIRST_LESION_ID, FIRST_LESION_ID + n))
    invasive = np.array([len(d) > 2 and d[2] == "Melanoma Invasive" for d in diagnoses])
    thick = np.where(invasive & (rng.random(n) < 0.7), np.round(rng.lognormal(np.log(0.6), 0.6, n), 2), np.nan)
    mitotic = np.where(invasive & (rng.random(n) < 0.6), rng.choice(MITOTIC_INDEX, n), None)

    table = pd.DataFrame({
        "isic_id": [f"ISIC_{FIRST_ID + i:07d}" for i in range(n)],
        "target": malignant.astype(int),
        "patient_id": [f"IP_{FIRST_PATIENT_ID + p:07d}" for p in patient],
        "age_approx": ages[patient],
        "sex": sexes[patient],
        "anatom_site_general": [LOCATIONS[i][2] or None for i in loc],
        "image_type": "TBP tile: close-up",
        "tbp_tile_type": tiles[patient],
        "tbp_lv_location": [LOCATIONS[i][0] for i in loc],
        "tbp_lv_location_simple": [LOCATIONS[i][1] for i in loc],
        "tbp_lv_x": np.round(body[:, 0], 4), "tbp_lv_y": np.round(body[:, 1], 4), "tbp_lv_z": np.round(body[:, 2], 4),
        "attribution": [names[c] for c in clinics[patient]],
        "copyright_license": "CC-BY",
        # Malignant and histologically detailed benign lesions have a lesion id, plain "Benign" ones none.
        "lesion_id": [f"IL_{next(lesion_next):07d}" if len(d) > 1 else None for d in diagnoses],
        "iddx_full": ["::".join(d) for d in diagnoses],
        **{col: [d[k] if k < len(d) else None for d in diagnoses] for k, col in enumerate(IDDX_COLUMNS)},
        "mel_mitotic_index": mitotic,
        "mel_thick_mm": thick,
        **_measurements(rng, m),
    })
    return table[list(METADATA_COLUMNS)]


def isic2024_counts(table: pd.DataFrame) -> dict:
    """Counts of a metadata table: rows, malignant rows, patients, lesions per patient (min, median, max)."""
    per_patient = table["patient_id"].value_counts()
    return {"n_images": len(table), "malignant": int(table["target"].sum()), "n_patients": len(per_patient),
            "images_per_patient": [int(per_patient.min()), int(per_patient.median()), int(per_patient.max())]}


def patient_skin_tones(table: pd.DataFrame, seed: int = 0) -> pd.Series:
    """Skin tone (index into kmel.constants.SKIN_TONE_GROUPS) of each row's patient: one tone per patient."""
    rng = np.random.default_rng([seed, 3])
    patients = sorted(table["patient_id"].unique())
    tones = dict(zip(patients, rng.choice(len(TONE_WEIGHTS), len(patients), p=TONE_WEIGHTS)))
    return table["patient_id"].map(tones).astype(int)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _base_keys(malignant: np.ndarray, tones: np.ndarray) -> list[tuple[int, int, int]]:
    """(malignant, tone, base index) per row. Each (malignant, tone) group gets its share of the class's
    pool; a group with fewer rows than that gets a base per row, a larger one reuses its bases in turn."""
    groups = list(zip(malignant.astype(int).tolist(), tones.astype(int).tolist()))
    per_group = Counter(groups)
    per_class = Counter(mal for mal, _ in groups)
    pools = {g: min(c, max(1, math.ceil(POOL_SIZE[bool(g[0])] * c / per_class[g[0]]))) for g, c in per_group.items()}
    rank: Counter = Counter()
    keys = []
    for group in groups:
        keys.append((*group, rank[group] % pools[group]))
        rank[group] += 1
    return keys


def _draw_base(seed: int, key: tuple[int, int, int], side: int) -> bytes:
    """A base lesion as high-quality JPEG bytes (small to keep in the pool)."""
    malignant, tone, index = key
    rng = np.random.default_rng([seed, 1, malignant, tone, index])
    hair = bool(rng.random() < HAIR_FRACTION)
    image, _ = draw_image(rng, side, side, bool(malignant), tone, hair, None)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR; crops stay BGR until encoded
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, BASE_JPEG_QUALITY])
    if not ok:
        raise OSError("could not encode a base lesion")
    return data.tobytes()


def _crop(rng: np.random.Generator, base: np.ndarray, size: int, quality: int) -> bytes:
    """A shifted, rotated, flipped, rescaled, brightness-jittered copy of ``base`` as JPEG bytes."""
    side = base.shape[0]
    window = int(round(side * rng.uniform(0.85, 0.97)))
    y0, x0 = rng.integers(0, side - window + 1, 2)
    crop = np.rot90(base[y0:y0 + window, x0:x0 + window], int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = int(round(size * rng.uniform(0.92, 1.10)))  # the real crops vary 119-141 px around 130
    crop = cv2.resize(np.ascontiguousarray(crop), (out, out),
                      interpolation=cv2.INTER_AREA if out < window else cv2.INTER_LINEAR)
    crop = cv2.convertScaleAbs(crop, alpha=float(rng.uniform(0.94, 1.06)), beta=float(rng.uniform(-4, 4)))
    ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("could not encode a crop")
    return data.tobytes()


def make_isic2024_dataset(out_dir: Path, n_images: int = 200, seed: int = 0, malignant_fraction: float = 0.01,
                          size: int = 128, jpeg_quality: int = 90, progress: bool = False) -> pd.DataFrame:
    """Write an ISIC 2024 challenge shaped folder: ``train-image.hdf5`` and ``train-metadata.csv``.

    Each image is a scalar HDF5 dataset named by its ``isic_id`` (``ISIC_9500000`` upwards) holding the
    JPEG bytes with dtype ``S<n>``, as in the real file; crops are about ``size`` px square (0.92-1.10
    times it). The metadata has the real table's 55 columns in its order (:data:`METADATA_COLUMNS`).
    About ``n_images / 20`` patients with skewed lesion counts; ``malignant_fraction`` of the rows are
    malignant, at least 1 from 20 rows and 2 from 50 (:func:`n_malignant`). Both files are written under
    temporary names and renamed when complete, the CSV last (an old CSV is removed first, so a folder with a
    CSV is complete). The same seed gives the same bytes.

    Args:
        out_dir: folder to write (created if missing).
        n_images: crops (rows) in total.
        seed: random seed.
        malignant_fraction: share of malignant rows (the real set has about 0.001).
        size: typical crop side in pixels.
        jpeg_quality: JPEG quality of the stored crops.
        progress: show a progress bar (on a terminal).

    Returns:
        The metadata table, read back from the CSV (as a reader of the folder gets it).
    """
    import h5py
    from tqdm.auto import tqdm

    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise ValueError(f"malignant_fraction must be in [0, 1], got {malignant_fraction}")
    if size < 32 or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"size must be at least 32 and jpeg_quality in 1..100, got {size} and {jpeg_quality}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = make_isic2024_metadata(n_images, seed, malignant_fraction)
    keys = _base_keys(table["target"].to_numpy(bool), patient_skin_tones(table, seed).to_numpy())
    reused = {k for k, c in Counter(keys).items() if c > 1}  # kept in the pool once drawn
    pool: dict[tuple[int, int, int], bytes] = {}
    digests: set[bytes] = set()
    base_side = int(round(size * BASE_MARGIN))
    (out_dir / METADATA_CSV).unlink(missing_ok=True)
    partial = out_dir / (IMAGES_HDF5 + ".partial")
    with h5py.File(partial, "w") as f:
        for i, (isic_id, key) in enumerate(tqdm(list(zip(table["isic_id"], keys)), desc="isic2024 crops",
                                                unit="crop", disable=None if progress else True)):
            jpeg = pool.get(key) or _draw_base(seed, key, base_side)
            if key in reused:
                pool[key] = jpeg
            base = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            rng = np.random.default_rng([seed, 2, i])
            for _ in range(100):  # a redraw of the jitter in the (rare) case of byte-identical crops
                data = _crop(rng, base, size, jpeg_quality)
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if digest not in digests:
                    break
            else:
                raise RuntimeError(f"could not make {isic_id} differ from the other crops of its base lesion")
            digests.add(digest)
            # np.bytes_ gives the real file's fixed-length dtype S<n>; it drops trailing NULs, and a
            # JPEG ends with FF D9.
            f.create_dataset(isic_id, data=np.bytes_(data))
    os.replace(partial, out_dir / IMAGES_HDF5)
    partial = out_dir / (METADATA_CSV + ".partial")
    table.to_csv(partial, index=False, lineterminator="\n")
    os.replace(partial, out_dir / METADATA_CSV)
    return pd.read_csv(out_dir / METADATA_CSV, low_memory=False)

