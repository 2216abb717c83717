"""Synthetic ISIC-format data: image properties the pipeline relies on, folder layout, determinism."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kmel.constants import ITA_CATEGORIES, ITA_EDGES, SKIN_TONE_EDGES, SKIN_TONE_GROUPS
from kmel.data.synthetic import (
    _tone_counts,
    make_prediction_folder,
    make_synthetic_dataset,
)
from kmel.data.synthetic_images import (
    SKIN_ITA_CATEGORY,
    SKIN_RGB,
    draw_hair,
    make_lesion_image,
)


# === Hand-written references (independent of kmel.data.synthetic) ===
def brightness_group(brightness: float) -> int:
    """Reference groups: very_light (index 0) is brightest (> 192), dark (index 4) darkest (< 96)."""
    lo = SKIN_TONE_EDGES  # (96, 128, 160, 192)
    if brightness > lo[3]:
        return 0
    if brightness > lo[2]:
        return 1
    if brightness > lo[1]:
        return 2
    if brightness > lo[0]:
        return 3
    return 4


def ita_of(rgb: np.ndarray) -> float:
    """ITA (degrees) of the mean colour of RGB uint8 pixels (N, 3), via OpenCV's 8-bit Lab."""
    lab = cv2.cvtColor(rgb.reshape(1, -1, 3).astype(np.uint8), cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(float)
    l_star = lab[:, 0].mean() * 100.0 / 255.0
    b_star = lab[:, 2].mean() - 128.0
    return math.degrees(math.atan((l_star - 50.0) / b_star))


def ita_category(ita: float) -> int:
    for i, edge in enumerate(ITA_EDGES):  # (55, 41, 28, 10, -30), lightest first
        if ita > edge:
            return i
    return len(ITA_EDGES)


def solidity(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    area = sum(cv2.contourArea(c) for c in contours)
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    return area / hull


def skin_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Skin well away from the lesion and out of the vignetted corners."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    central = np.hypot(yy - h / 2, xx - w / 2) < 0.45 * min(h, w)
    away = cv2.dilate(mask, np.ones((9, 9), np.uint8)) == 0
    return image[central & away]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# === Single images ===
@pytest.mark.parametrize("malignant", [False, True])
@pytest.mark.parametrize("hair", [False, True])
def test_shapes_dtypes_and_binary_mask(malignant, hair):
    image, mask = make_lesion_image(np.random.default_rng(3), 96, malignant=malignant, skin_tone=1, hair=hair)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}


def test_same_generator_state_gives_same_image():
    a = make_lesion_image(np.random.default_rng(5), 64, malignant=True, hair=True)
    b = make_lesion_image(np.random.default_rng(5), 64, malignant=True, hair=True)
    c = make_lesion_image(np.random.default_rng(6), 64, malignant=True, hair=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("malignant", [False, True])
def test_lesion_scale_sets_the_lesion_size(malignant):
    side = 200
    for scale in (0.15, 0.4):
        areas = [(make_lesion_image(np.random.default_rng(i), side, malignant, 2, lesion_scale=scale)[1] > 0).sum()
                 for i in range(5)]
        diameter = 2 * math.sqrt(np.mean(areas) / math.pi) / side  # equal-area circle
        assert 0.6 * scale < diameter < 1.1 * scale, (scale, diameter)


def test_default_lesion_sizes_stay_within_10_to_45_percent_and_near_the_centre():
    side = 128
    for i in range(30):
        _, mask = make_lesion_image(np.random.default_rng(i), side, malignant=bool(i % 2), skin_tone=i % 5)
        ys, xs = np.nonzero(mask)
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
        assert 0.07 <= extent <= 0.5, extent
        assert abs(xs.mean() - side / 2) < 0.2 * side and abs(ys.mean() - side / 2) < 0.2 * side


@pytest.mark.parametrize("tone", range(5))
def test_lesion_is_darker_than_skin_inside_the_mask(tone):
    for i, malignant in enumerate([False, True] * 3):
        image, mask = make_lesion_image(np.random.default_rng([tone, i]), 128, malignant, tone)
        lesion = image[mask > 0].astype(float).mean()
        skin = skin_pixels(image, mask).astype(float).mean()
        assert lesion < skin - 10, (tone, malignant, lesion, skin)


def test_malignant_lesions_are_more_irregular_and_more_varied_in_colour():
    stats = {False: {"solidity": [], "std": []}, True: {"solidity": [], "std": []}}
    for malignant in (False, True):
        for i in range(20):
            image, mask = make_lesion_image(np.random.default_rng([11, i]), 160, malignant, skin_tone=i % 5)
            stats[malignant]["solidity"].append(solidity(mask))
            inner = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0  # leave out the soft edge
            stats[malignant]["std"].append(image[inner].astype(float).std(axis=0).mean())
    benign, malignant = stats[False], stats[True]
    assert np.mean(benign["solidity"]) > 0.96  # smooth ovals are nearly convex
    assert np.mean(malignant["solidity"]) < np.mean(benign["solidity"]) - 0.04
    assert np.mean(malignant["std"]) > 1.5 * np.mean(benign["std"])


# === Skin tone ===
def test_skin_base_colours_land_in_their_brightness_group_and_ita_category():
    assert sorted(SKIN_RGB) == list(range(len(SKIN_TONE_GROUPS)))
    brightness = [float(np.mean(SKIN_RGB[t])) for t in range(5)]
    assert brightness == sorted(brightness, reverse=True)  # very_light brightest ... dark darkest
    itas = []
    for tone, rgb in SKIN_RGB.items():
        assert brightness_group(float(np.mean(rgb))) == tone, (tone, rgb)
        ita = ita_of(np.array([rgb]))
        itas.append(ita)
        assert ita_category(ita) == SKIN_ITA_CATEGORY[tone], (tone, rgb, ita)
        r, g, b = rgb
        assert r > g > b  # skin-like: red over green over blue
    assert itas == sorted(itas, reverse=True)
    # Hand-checked anchors: the lightest is ITA "very_light", the darkest ITA "dark".
    assert ITA_CATEGORIES[SKIN_ITA_CATEGORY[0]] == "very_light"
    assert ITA_CATEGORIES[SKIN_ITA_CATEGORY[4]] == "dark"


@pytest.mark.parametrize("tone", range(5))
def test_rendered_skin_keeps_its_group_and_category(tone):
    """Shading, texture, jitter and hair must not push the measured skin into another group."""
    for i in range(6):
        image, mask = make_lesion_image(np.random.default_rng([tone, 100 + i]), 128, bool(i % 2), tone,
                                        hair=False)
        skin = skin_pixels(image, mask)
        assert brightness_group(float(skin.astype(float).mean())) == tone
        assert ita_category(ita_of(skin)) == SKIN_ITA_CATEGORY[tone]


def test_vignette_darkens_the_corners():
    image, mask = make_lesion_image(np.random.default_rng(2), 128, skin_tone=0)
    corners = np.concatenate([image[:6, :6], image[:6, -6:], image[-6:, :6], image[-6:, -6:]]).astype(float).mean()
    assert corners < skin_pixels(image, mask).astype(float).mean() - 8


# === Hair ===
@pytest.mark.parametrize("tone", [0, 4])
def test_draw_hair_returns_mask_of_darker_strands_and_leaves_other_pixels(tone):
    base, lesion = make_lesion_image(np.random.default_rng(tone), 128, skin_tone=tone)
    before = base.copy()
    hairy, hair = draw_hair(base, np.random.default_rng(9))
    assert np.array_equal(base, before), "input image is not modified"
    assert hairy.shape == base.shape and hairy.dtype == np.uint8
    assert hair.shape == base.shape[:2] and hair.dtype == np.uint8 and set(np.unique(hair)) == {0, 255}
    assert 0.002 < (hair > 0).mean() < 0.3
    on_skin = (hair > 0) & (lesion == 0)
    assert hairy[on_skin].astype(float).mean() < base[on_skin].astype(float).mean() - 15
    assert hairy[on_skin].astype(float).mean() < skin_pixels(base, lesion).astype(float).mean()
    far = cv2.dilate(hair, np.ones((5, 5), np.uint8)) == 0
    assert np.array_equal(hairy[far], base[far])


def test_draw_hair_count_and_thickness():
    blank = np.full((128, 128, 3), 200, np.uint8)
    _, none = draw_hair(blank, np.random.default_rng(0), n_hairs=(0, 0))
    assert not none.any()
    for seed in range(15):
        _, one = draw_hair(blank, np.random.default_rng(seed), n_hairs=(1, 1))
        # Every strand crosses the inner image for a good length...
        assert (one > 0).sum() >= 0.3 * 128
        # ... and is 1-3 px thick: no strand pixel is more than 2 px from the background.
        inside = cv2.distanceTransform((one > 0).astype(np.uint8), cv2.DIST_L2, 5)
        assert inside.max() <= 2.0
    _, many = draw_hair(blank, np.random.default_rng(3), n_hairs=(20, 20))
    assert (many > 0).sum() > 8 * (one > 0).sum()


def test_hair_in_image_is_darker_than_skin():
    plain, mask = make_lesion_image(np.random.default_rng(4), 128, skin_tone=2, hair=False)
    hairy, _ = make_lesion_image(np.random.default_rng(4), 128, skin_tone=2, hair=True)
    diff = plain.astype(int).mean(axis=2) - hairy.astype(int).mean(axis=2)
    assert (diff > 30).sum() > 50  # visible dark strands were added


# === Data folder ===
N, SIZE = 40, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    summary = make_synthetic_dataset(out, n_images=N, seed=0, size=SIZE)
    return out, summary


def _header(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_layout_and_headers(folder):
    out, _ = folder
    assert _header(out / "ISIC_2019_Training_GroundTruth.csv") == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert _header(out / "ISIC_2019_Training_Metadata.csv") == "image,age_approx,anatom_site_general,lesion_id,sex"
    assert _header(out / "ISIC_2020_Training_GroundTruth_v2.csv") == (
        "image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
        "benign_malignant,target")
    assert _header(out / "synthetic_truth.csv") == "image_id,skin_tone,malignant,hair"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2019", "2020"]
    assert (out / "masks").is_dir()


def test_labels_ids_and_files(folder):
    out, summary = folder
    gt19 = pd.read_csv(out / "ISIC_2019_Training_GroundTruth.csv", dtype={"image": str})
    meta19 = pd.read_csv(out / "ISIC_2019_Training_Metadata.csv", dtype=str, keep_default_na=False)
    gt20 = pd.read_csv(out / "ISIC_2020_Training_GroundTruth_v2.csv", dtype={"patient_id": str})
    truth = pd.read_csv(out / "synthetic_truth.csv").set_index("image_id")
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert (gt19[classes].sum(axis=1) == 1.0).all() and set(np.unique(gt19[classes])) == {0.0, 1.0}
    assert "1.0" in (out / "ISIC_2019_Training_GroundTruth.csv").read_text()  # floats, as the real file
    assert list(meta19["image"]) == list(gt19["image"])
    assert len(gt19) == summary["per_year"]["2019"] == N - N // 2 and len(gt20) == summary["per_year"]["2020"]

    ids = list(gt19["image"]) + list(gt20["image_name"])
    assert len(ids) == len(set(ids)) == N and sorted(ids) == sorted(truth.index)
    assert all(len(i) == 12 and i.startswith("ISIC_") and int(i[5:]) >= 9_000_000 for i in ids)
    for year, year_ids in (("2019", gt19["image"]), ("2020", gt20["image_name"])):
        for image_id in year_ids:
            image = cv2.imread(str(out / "images" / year / f"{image_id}.jpg"))
            mask = cv2.imread(str(out / "masks" / f"{image_id}_segmentation.png"), cv2.IMREAD_UNCHANGED)
            assert image is not None and mask is not None, image_id
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
            assert image.shape[1] == SIZE and image.shape[0] in (SIZE, int(SIZE * 0.75))
    assert len(list((out / "images").rglob("*.jpg"))) == N and len(list((out / "masks").glob("*.png"))) == N

    # Labels agree with the truth table and with each other.
    mal19 = gt19.set_index("image")[["MEL", "BCC"]].sum(axis=1)
    assert (mal19 == truth.loc[mal19.index, "malignant"]).all()
    benign19 = gt19.set_index("image")[["NV", "BKL"]].sum(axis=1)
    assert (benign19 == 1 - truth.loc[benign19.index, "malignant"]).all()
    g = gt20.set_index("image_name")
    assert (g["target"] == truth.loc[g.index, "malignant"]).all()
    assert (g["benign_malignant"] == np.where(g["target"] == 1, "malignant", "benign")).all()
    assert set(g.loc[g["target"] == 1, "diagnosis"]) == {"melanoma"}
    assert set(g.loc[g["target"] == 0, "diagnosis"]) <= {"nevus", "unknown"}
    assert summary["malignant"] == truth["malignant"].sum() == round(0.3 * 20) * 2
    assert summary["hair"] == truth["hair"].sum() == round(0.3 * N)


def test_patients_have_several_images(folder):
    out, summary = folder
    gt20 = pd.read_csv(out / "ISIC_2020_Training_GroundTruth_v2.csv", dtype=str)
    per_patient = gt20["patient_id"].value_counts()
    assert len(per_patient) == summary["n_patients"] == (N // 2) // 3
    assert per_patient.min() >= 3
    assert gt20["patient_id"].str.fullmatch(r"IP_\d{7}").all()
    assert gt20["lesion_id"].str.fullmatch(r"IL_\d{7}").all() and gt20["lesion_id"].is_unique


def test_skin_tones_and_sizes_are_spread(folder):
    out, summary = folder
    truth = pd.read_csv(out / "synthetic_truth.csv")
    counts = truth["skin_tone"].value_counts().reindex(range(5), fill_value=0)
    assert (counts >= math.ceil(0.05 * N)).all()
    assert counts[0] >= counts[4] and counts[1] >= counts[3]  # lighter tones are more common
    assert summary["per_skin_tone"] == {SKIN_TONE_GROUPS[t]: int(counts[t]) for t in range(5)}
    shapes = {cv2.imread(str(p)).shape[:2] for p in (out / "images").rglob("*.jpg")}
    assert shapes == {(SIZE, SIZE), (int(SIZE * 0.75), SIZE)}


@pytest.mark.parametrize("n", [1, 4, 5, 7, 20, 33, 120, 1000])
def test_tone_counts_sum_and_floor(n):
    counts = _tone_counts(n)
    assert sum(counts) == n and len(counts) == 5
    if n >= 20:
        assert min(counts) >= math.ceil(0.05 * n)
        assert counts[0] == max(counts)


def test_same_seed_same_bytes_other_seed_other_bytes(folder, tmp_path):
    out, _ = folder
    again = tmp_path / "again"
    make_synthetic_dataset(again, n_images=N, seed=0, size=SIZE)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all(sha(out / f) == sha(again / f) for f in files)
    other = tmp_path / "other"
    make_synthetic_dataset(other, n_images=N, seed=1, size=SIZE)
    images = [f for f in files if f.suffix == ".jpg"]
    assert sum(sha(out / f) != sha(other / f) for f in images) == len(images)


def test_prediction_folder(tmp_path):
    truth = make_prediction_folder(tmp_path / "pred", n_images=10, seed=1, size=SIZE)
    assert list(truth.columns) == ["image", "target"] and len(truth) == 10
    assert truth["image"].tolist() == [f"ISIC_{9_900_000 + i:07d}" for i in range(10)]
    assert set(truth["target"]) == {0, 1}
    on_disk = pd.read_csv(tmp_path / "pred" / "truth.csv", dtype={"image": str})
    pd.testing.assert_frame_equal(on_disk, truth)
    files = sorted(p.stem for p in (tmp_path / "pred").glob("*.jpg"))
    assert files == sorted(truth["image"])
    assert not list((tmp_path / "pred").glob("*.png"))  # a flat folder of images to predict, no masks


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="skin_tone"):
        make_lesion_image(np.random.default_rng(0), 32, skin_tone=5)
    with pytest.raises(ValueError, match="malignant_fraction"):
        make_synthetic_dataset(tmp_path, n_images=4, malignant_fraction=1.5)


def test_full_size_folder_has_every_image(tmp_path):
    """(Its speed is a benchmark's business: bench/synthetic.py prints images/s.)"""
    summary = make_synthetic_dataset(tmp_path, n_images=120, seed=2, size=256)
    assert summary["n_images"] == 120
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 120
    assert len(list((tmp_path / "masks").glob("*_segmentation.png"))) == 120
