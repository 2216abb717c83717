"""Metadata rules checked on small hand-written tables (no real data needed)."""

from __future__ import annotations

import pandas as pd

from kmel import constants as C
from kmel.data.metadata import load_metadata


def test_duplicate_list_year_only_drops_that_year(tmp_path):
    pd.DataFrame({"image_id": ["ISIC_0000001", "ISIC_0000002"], "melanoma": [0, 1],
                  "seborrheic_keratosis": [0, 0]}).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "x_duplicates.txt").write_text(
        "/home/someone/ISIC/2016/train/ISIC_0000001.jpg\n/home/someone/ISIC/2017/train/ISIC_0000002.jpg\n"
    )
    table, report = load_metadata(tmp_path)
    # The 2016 path names a 2017 id: not dropped; the 2017 path is.
    assert list(table[C.COL_IMAGE_ID]) == ["ISIC_0000001"]
    assert report["dropped"] == {"named in a duplicate list": 1}


def test_empty_and_unknown_labels_dropped_and_counted(tmp_path):
    (tmp_path / "labels.csv").write_text("image_id,label\nA,benign\nB,malignant\nC,\nD,maybe\nE,1\n")
    table, report = load_metadata(tmp_path)
    assert sorted(table[C.COL_IMAGE_ID]) == ["A", "B", "E"]
    assert list(table.sort_values(C.COL_IMAGE_ID)[C.COL_MALIGNANT]) == [0, 1, 1]
    assert report["dropped"]["no usable label (empty, NaN or unknown value)"] == 2


def test_same_id_twice_in_one_file_with_conflicting_labels(tmp_path):
    (tmp_path / "labels.csv").write_text("image_id,label\nA,benign\nA,malignant\nB,benign\nB,benign\n")
    table, report = load_metadata(tmp_path)
    assert sorted(table[C.COL_IMAGE_ID]) == ["A", "B"]
    assert dict(zip(table[C.COL_IMAGE_ID], table[C.COL_MALIGNANT])) == {"A": 1, "B": 0}
    assert [c["image_id"] for c in report["conflicts"]] == ["A"]
    assert report["dropped"]["listed twice in one source (e.g. 2020 v1 and v2 both present)"] == 2
