"""Fitzpatrick17k (CC BY-NC-SA 3.0): clinical images with an annotated Fitzpatrick type."""

from __future__ import annotations

import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import _frame, register_format


@register_format("fitzpatrick17k", ("md5hash", "fitzpatrick_scale", "three_partition_label", "label"), "subset",
                 about="Fitzpatrick17k")
def _read_fitzpatrick17k(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    three = df["three_partition_label"].str.strip().str.lower()
    mal = (three == "malignant").astype(float).where(three.notna() & (three != ""))
    label = df["label"].fillna("").str.strip().str.lower()
    fitz = pd.to_numeric(df["fitzpatrick_scale"], errors="coerce")
    fitz = fitz.where(fitz.between(1, 6), -1).fillna(-1).astype(int)
    return _frame(image_id=df["md5hash"], source="fitzpatrick17k", year=2021, diagnosis=label, malignant=mal,
                  melanoma=label.str.contains("melanoma").astype(float),
                  keratosis=(label == "seborrheic keratosis").astype(float), fitzpatrick=fitz)
