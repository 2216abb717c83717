"""Official metadata files read exactly as published (real files from ../shared/data/metadata)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.data.formats.registry import read_metadata_csv
from kmel.data.metadata import (
    apply_task,
    load_metadata,
    read_duplicate_list,
    split_table,
)

pytestmark = pytest.mark.realdata

# Counts read off the published files (wc -l minus header, and the malignant column summed by hand).
EXPECTED = {
    "ISBI2016_ISIC_Part3_Training_GroundTruth.csv": ("isic2016", 900, 173),
    "ISBI2016_ISIC_Part3_Test_GroundTruth.csv": ("isic2016", 379, 75),
    "ISIC-2017_Training_Part3_GroundTruth.csv": ("isic2017", 2000, 374),
    "ISIC_2020_Training_GroundTruth.csv": ("isic2020_v1", 33126, 584),
    "ISIC_2020_Training_GroundTruth_v2.csv": ("isic2020_v2", 33126, 584),
    "fitzpatrick17k.csv": ("fitzpatrick17k", 16577, 2263),
}


@pytest.fixture(scope="module")
def meta_dir(shared_data: Path) -> Path:
    return shared_data / "metadata"


@pytest.fixture(scope="module")
def loaded(meta_dir: Path):
    return load_metadata(meta_dir)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_file_recognised_with_counts(meta_dir, name):
    kind, rows, malignant = EXPECTED[name]
    parsed = read_metadata_csv(meta_dir / name)
    assert parsed is not None, name
    got_kind, frame = parsed
    assert got_kind == kind
    assert len(frame) == rows
    assert int(frame[C.COL_MALIGNANT].sum()) == malignant


def test_every_shipped_csv_is_recognised(meta_dir):
    kinds = {p.name: read_metadata_csv(p) for p in meta_dir.glob("*.csv")}
    unknown = [n for n, k in kinds.items() if k is None]
    assert unknown == []
    by_kind = {n: k[0] for n, k in kinds.items()}
    assert by_kind["HAM10000_metadata.csv"] == "ham10000"
    assert by_kind["ISIC_2019_Training_GroundTruth.csv"] == "isic2019"
    assert by_kind["ISIC_2019_Training_Metadata.csv"] == "isic2019_meta"
    assert by_kind["ISIC-2017_Training_Data_metadata.csv"] == "isic2017_meta"
    assert by_kind["ISIC2018_Task3_Validation_GroundTruth.csv"] == "isic2018"
    assert by_kind["ISIC_2020_Training_Duplicates.csv"] == "duplicates2020"


def test_isic2019_one_hot_decoded(meta_dir):
    _, frame = read_metadata_csv(meta_dir / "ISIC_2019_Training_GroundTruth.csv")
    raw = pd.read_csv(meta_dir / "ISIC_2019_Training_GroundTruth.csv")
    assert len(frame) == len(raw) == 25331
    # Melanoma count equals the MEL column's sum; malignant = MEL + BCC + AK + SCC.
    assert int(frame[C.COL_MELANOMA].sum()) == int(raw["MEL"].sum())
    assert int(frame[C.COL_MALIGNANT].sum()) == int(raw[["MEL", "BCC", "AK", "SCC"]].sum().sum())
    assert set(frame[C.COL_DIAGNOSIS]) <= {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"}


def test_renamed_files_are_recognised_by_header(meta_dir, tmp_path):
    shutil.copy(meta_dir / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", tmp_path / "2016_Metadata.csv")
    shutil.copy(meta_dir / "ISIC_2020_Training_GroundTruth_v2.csv", tmp_path / "2020_Metadata.csv")
    (tmp_path / "notes.csv").write_text("foo,bar\n1,2\n")
    table, report = load_metadata(tmp_path)
    kinds = {k: v["kind"] for k, v in report["files"].items()}
    assert kinds == {"2016_Metadata.csv": "isic2016", "2020_Metadata.csv": "isic2020_v2"}
    assert report["unrecognised_files"] == [str(tmp_path / "notes.csv")]
    assert set(table[C.COL_SOURCE]) == {"isic2016", "isic2020"}


def test_whole_folder_clean_table(loaded):
    table, report = loaded
    assert len(table) == 74809
    assert report["rows_per_source"] == {
        "fitzpatrick17k": 16577, "isic2016": 323, "isic2018": 193, "isic2019": 25023, "isic2020": 32693,
    }
    assert report["dropped"] == {
        "listed twice in one source (e.g. 2020 v1 and v2 both present)": 33126,
        "named in a duplicate list": 23910,
        "same image in several sources (newest kept)": 1479,
    }
    # Every image once.
    assert not table["base_id"].duplicated().any()
    assert table[C.COL_MALIGNANT].isin([0, 1]).all()


def test_label_conflicts_reported_and_resolved_malignant(loaded):
    table, report = loaded
    conflicts = {c["image_id"]: c for c in report["conflicts"]}
    assert sorted(conflicts) == ["ISIC_0000077", "ISIC_0000511", "ISIC_0010094"]
    for base, conflict in conflicts.items():
        labels = {entry["malignant"] for entry in conflict["labels"]}
        assert labels == {0.0, 1.0} and len(conflict["labels"]) >= 2
        assert int(table.loc[table["base_id"] == base, C.COL_MALIGNANT].iloc[0]) == 1


def test_2020_duplicate_pairs_keep_exactly_one_copy(loaded, meta_dir):
    table, report = loaded
    pairs = pd.read_csv(meta_dir / "ISIC_2020_Training_Duplicates.csv")
    in_2020 = set(table.loc[table[C.COL_SOURCE] == "isic2020", C.COL_IMAGE_ID])
    # The shipped duplicate list 06 already removed image_name_1 of 425 pairs; the pair file must then
    # keep image_name_2, not drop it too (which would lose 425 images).
    kept = [(a in in_2020) + (b in in_2020) for a, b in zip(pairs["image_name_1"], pairs["image_name_2"])]
    assert kept == [1] * len(pairs)
    assert report["rows_per_source"]["isic2020"] == 32693


def test_2020_pair_file_alone_drops_image_name_2(meta_dir, tmp_path):
    shutil.copy(meta_dir / "ISIC_2020_Training_GroundTruth_v2.csv", tmp_path)
    shutil.copy(meta_dir / "ISIC_2020_Training_Duplicates.csv", tmp_path)
    table, report = load_metadata(tmp_path)
    pairs = pd.read_csv(meta_dir / "ISIC_2020_Training_Duplicates.csv")
    ids = set(table[C.COL_IMAGE_ID])
    assert set(pairs["image_name_1"]) <= ids and not (set(pairs["image_name_2"]) & ids)
    assert report["dropped"] == {"ISIC 2020 duplicate pair (one copy dropped)": 425}
    assert len(table) == 33126 - 425


def test_duplicate_lists_match_on_stem_and_year(meta_dir):
    lists = sorted((meta_dir / "isic_duplicate_lists").glob("*.txt"))
    assert len(lists) == 12
    entries = read_duplicate_list(lists[0])
    assert entries and all(stem.startswith("ISIC_") and "/" not in stem and "." not in stem for _, stem in entries)
    first_line = lists[0].read_text().splitlines()[0]
    assert first_line.startswith("/")  # someone else's absolute path; only the stem (and year) is used


def test_ham10000_lesion_ids_and_task_labels(meta_dir):
    _, ham = read_metadata_csv(meta_dir / "HAM10000_metadata.csv")
    assert len(ham) == 10015
    assert ham[C.COL_LESION].notna().all()
    mel = apply_task(ham, "melanoma")
    assert int(mel[C.COL_TARGET].sum()) == 1113  # HAM10000 paper: 1,113 melanomas
    with pytest.raises(ValueError, match="unknown task"):
        apply_task(ham, "nevus")


def test_split_keeps_patients_together_and_is_deterministic(loaded):
    table, _ = loaded
    isic2020 = apply_task(table[table[C.COL_SOURCE] == "isic2020"], "malignant")
    isic2020 = isic2020.assign(**{C.COL_SKIN_TONE: 0})
    a = split_table(isic2020, 0.15, 0.15, seed=3)
    b = split_table(isic2020, 0.15, 0.15, seed=3)
    c = split_table(isic2020, 0.15, 0.15, seed=4)
    assert (a[C.COL_SPLIT] == b[C.COL_SPLIT]).all()
    assert not (a[C.COL_SPLIT] == c[C.COL_SPLIT]).all()
    per_patient = a.groupby(C.COL_PATIENT)[C.COL_SPLIT].nunique()
    assert (per_patient == 1).all()
    fractions = a[C.COL_SPLIT].value_counts(normalize=True)
    # Patients hold 1..115 images, so fractions are close to but not exactly the targets.
    assert abs(fractions["test"] - 0.15) < 0.03 and abs(fractions["val"] - 0.15) < 0.03
    # Malignant patients spread over all three splits.
    malignant = a[a[C.COL_TARGET] == 1][C.COL_SPLIT].value_counts(normalize=True)
    assert np.all(malignant.reindex(["train", "val", "test"]).fillna(0) > 0.08)


def test_split_rejects_bad_fractions(loaded):
    table, _ = loaded
    small = apply_task(table.head(50), "malignant")
    with pytest.raises(ValueError):
        split_table(small, 0.6, 0.5, seed=0)
