"""The synthetic ISIC 2024 (SLICE-3D) folder: the real files' shapes, the population, determinism, the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from kmel.data import synthetic_isic2024 as s24
from kmel.data.synthetic_isic2024 import (
    IMAGES_HDF5,
    METADATA_CSV,
    make_isic2024_dataset,
    make_isic2024_metadata,
    n_malignant,
)

# Written out here, not taken from the module: the train table's 55 columns in the challenge's order.
EXPECTED_COLUMNS = (
    "isic_id,target,patient_id,age_approx,sex,anatom_site_general,clin_size_long_diam_mm,image_type,"
    "tbp_tile_type,tbp_lv_A,tbp_lv_Aext,tbp_lv_B,tbp_lv_Bext,tbp_lv_C,tbp_lv_Cext,tbp_lv_H,tbp_lv_Hext,tbp_lv_L,"
    "tbp_lv_Lext,tbp_lv_areaMM2,tbp_lv_area_perim_ratio,tbp_lv_color_std_mean,tbp_lv_deltaA,tbp_lv_deltaB,"
    "tbp_lv_deltaL,tbp_lv_deltaLB,tbp_lv_deltaLBnorm,tbp_lv_eccentricity,tbp_lv_location,tbp_lv_location_simple,"
    "tbp_lv_minorAxisMM,tbp_lv_nevi_confidence,tbp_lv_norm_border,tbp_lv_norm_color,tbp_lv_perimeterMM,"
    "tbp_lv_radial_color_std_max,tbp_lv_stdL,tbp_lv_stdLExt,tbp_lv_symm_2axis,tbp_lv_symm_2axis_angle,tbp_lv_x,"
    "tbp_lv_y,tbp_lv_z,attribution,copyright_license,lesion_id,iddx_full,iddx_1,iddx_2,iddx_3,iddx_4,iddx_5,"
    "mel_mitotic_index,mel_thick_mm,tbp_lv_dnn_lesion_confidence"
).split(",")
N, SIZE = 200, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("isic2024")
    make_isic2024_dataset(out, n_images=N, seed=0, size=SIZE)
    return out


def _images(folder: Path) -> dict[str, bytes]:
    with h5py.File(folder / IMAGES_HDF5, "r") as f:
        return {key: bytes(f[key][()]) for key in f}


def test_metadata_has_the_55_columns_in_order(folder):
    assert len(EXPECTED_COLUMNS) == 55
    header = (folder / METADATA_CSV).read_text().splitlines()[0].split(",")
    assert header == EXPECTED_COLUMNS
    assert list(pd.read_csv(folder / METADATA_CSV).columns) == EXPECTED_COLUMNS


@pytest.mark.realdata
def test_columns_follow_the_real_sample_header(shared_data):
    sample = list(pd.read_csv(shared_data / "isic2024-sample" / "test-metadata.csv", nrows=0).columns)
    assert [c for c in EXPECTED_COLUMNS if c in sample] == sample  # the test table is the train one, less labels
    assert [c for c in sample if c.startswith("tbp_lv_")] == [c for c in EXPECTED_COLUMNS if c.startswith("tbp_lv_")
                                                              and c != "tbp_lv_dnn_lesion_confidence"]


def test_hdf5_holds_one_scalar_jpeg_per_row(folder):
    table = pd.read_csv(folder / METADATA_CSV)
    assert table["isic_id"].is_unique and table["isic_id"].str.fullmatch(r"ISIC_95\d{5}").all()
    with h5py.File(folder / IMAGES_HDF5, "r") as f:
        assert sorted(f.keys()) == sorted(table["isic_id"])
        sides = []
        for key in f:
            ds = f[key]
            assert ds.shape == () and ds.dtype.kind == "S"
            data = bytes(ds[()])
            assert len(data) == ds.dtype.itemsize  # np.bytes_ dropped no trailing byte
            assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
            direct = np.empty((), ds.dtype)
            ds.read_direct(direct)
            assert direct.tobytes() == data
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None and image.shape[0] == image.shape[1] and image.shape[2] == 3
            sides.append(image.shape[0])
            b, _, r = image.reshape(-1, 3).mean(axis=0)
            assert r > b + 5 and image.std() > 3  # skin is reddish (RGB stored the right way round), not flat
    assert 0.85 * SIZE <= min(sides) and max(sides) <= 1.15 * SIZE and len(set(sides)) > 3


def test_crops_have_distinct_bytes(folder):
    assert len({hashlib.sha256(b).digest() for b in _images(folder).values()}) == N


def test_crops_from_a_reused_pool_still_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(s24, "POOL_SIZE", {False: 3, True: 1})  # a few bases, each reused many times
    make_isic2024_dataset(tmp_path, n_images=60, seed=0, size=SIZE, malignant_fraction=0.1)
    images = _images(tmp_path)
    assert len(images) == 60 and len(set(images.values())) == 60


def test_malignant_share_with_at_least_one_or_two():
    assert [n_malignant(n, 0.01) for n in (10, 19, 20, 49, 50, 200, 1000, 50_000)] == [0, 0, 1, 1, 2, 2, 10, 500]
    assert n_malignant(100, 0.3) == 30 and n_malignant(5, 1.0) == 5 and n_malignant(100, 0.0) == 0
    for n in (20, 50, 333):
        table = make_isic2024_metadata(n, seed=4)
        assert table["target"].sum() == n_malignant(n, 0.01) and set(table["target"]) == {0, 1}


def test_patients_have_many_lesions_and_one_age_and_sex(folder):
    table = pd.read_csv(folder / METADATA_CSV)
    per_patient = table["patient_id"].value_counts()
    assert len(per_patient) == N // 20 and per_patient.min() >= 1 and per_patient.median() >= 5
    assert per_patient.max() >= 2 * per_patient.min()  # skewed counts
    assert table["patient_id"].str.fullmatch(r"IP_\d{7}").all()
    for column in ("age_approx", "sex", "attribution", "tbp_tile_type"):
        assert (table.groupby("patient_id")[column].nunique(dropna=False) == 1).all(), column


def test_same_seed_same_bytes_other_seed_differs(tmp_path, folder):
    make_isic2024_dataset(tmp_path / "again", n_images=N, seed=0, size=SIZE)
    assert (tmp_path / "again" / METADATA_CSV).read_bytes() == (folder / METADATA_CSV).read_bytes()
    assert _images(tmp_path / "again") == _images(folder)
    make_isic2024_dataset(tmp_path / "other", n_images=N, seed=1, size=SIZE)
    assert (tmp_path / "other" / METADATA_CSV).read_bytes() != (folder / METADATA_CSV).read_bytes()
    other, first = _images(tmp_path / "other"), _images(folder)
    assert sum(other[k] != first[k] for k in first) == N


def test_diagnosis_columns_and_lesion_ids(folder):
    table = pd.read_csv(folder / METADATA_CSV, keep_default_na=False)
    malignant, benign = table[table["target"] == 1], table[table["target"] == 0]
    assert malignant["lesion_id"].str.fullmatch(r"IL_\d{7}").all()
    assert (malignant["iddx_1"] == "Malignant").all() and (benign["iddx_1"] == "Benign").all()
    levels = table[["iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5"]].to_numpy()
    assert (table["iddx_full"] == ["::".join(v for v in row if v) for row in levels]).all()
    assert (malignant["iddx_3"] != "").all()
    plain = benign[benign["iddx_full"] == "Benign"]
    assert len(plain) > 0.8 * len(benign) and (plain["lesion_id"] == "").all() and (plain["iddx_2"] == "").all()
    assert table["lesion_id"][table["lesion_id"] != ""].is_unique
    assert set(table["image_type"]) == {"TBP tile: close-up"} and set(table["copyright_license"]) == {"CC-BY"}
    assert set(table["tbp_tile_type"]) <= {"3D: XP", "3D: white"} and table["attribution"].nunique() >= 2


def test_melanoma_columns_and_measurement_shift():
    table = make_isic2024_metadata(3000, seed=2, malignant_fraction=0.2)
    melanoma = table["iddx_2"] == s24.MELANOMA
    assert melanoma.any() and table.loc[~melanoma, ["mel_thick_mm", "mel_mitotic_index"]].isna().all().all()
    assert table.loc[melanoma, "mel_thick_mm"].notna().any()
    means = table.groupby("target")[["tbp_lv_areaMM2", "tbp_lv_color_std_mean", "tbp_lv_nevi_confidence"]].mean()
    assert means.loc[1, "tbp_lv_areaMM2"] > 1.3 * means.loc[0, "tbp_lv_areaMM2"]
    assert means.loc[1, "tbp_lv_color_std_mean"] > 1.5 * means.loc[0, "tbp_lv_color_std_mean"]
    assert means.loc[1, "tbp_lv_nevi_confidence"] < 0.7 * means.loc[0, "tbp_lv_nevi_confidence"]


@pytest.mark.parametrize("kwargs", [{"n_images": 0}, {"malignant_fraction": 1.5}, {"size": 16}, {"jpeg_quality": 0}])
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_isic2024_dataset(tmp_path, **{"n_images": 5, **kwargs})
    assert not (tmp_path / METADATA_CSV).exists()


def _invoke(*args: str):
    from click.testing import CliRunner

    from kmel.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_make_synthetic_isic2024(tmp_path):
    result = _invoke("make-synthetic", str(tmp_path / "d"), "--style", "isic2024", "--n-images", "25", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "'n_images': 25" in result.output and "'malignant': 1" in result.output
    table = pd.read_csv(tmp_path / "d" / METADATA_CSV)
    images = _images(tmp_path / "d")
    assert len(table) == 25 and sorted(images) == sorted(table["isic_id"])
    side = cv2.imdecode(np.frombuffer(images[table["isic_id"][0]], np.uint8), cv2.IMREAD_COLOR).shape[0]
    assert 0.9 * 128 <= side <= 1.1 * 128  # the isic2024 default size
    # The default style still writes the 2019 + 2020 folder, 256 px.
    assert _invoke("make-synthetic", str(tmp_path / "isic"), "--n-images", "2").exit_code == 0
    first = sorted((tmp_path / "isic" / "images").rglob("*.jpg"))[0]
    assert cv2.imread(str(first)).shape[1] == 256 and not (tmp_path / "isic" / IMAGES_HDF5).exists()
