"""Diverse Dermatology Images (Stanford AIMI): clinical photographs with Fitzpatrick bands; evaluation only by default."""

from __future__ import annotations

import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import YEARS, _frame, register_format

DDI_SKIN_TONE = {"12": "I-II", "34": "III-IV", "56": "V-VI"}


@register_format("ddi", ("DDI_file", "skin_tone", "malignant", "disease"), "subset",
                 about="Diverse Dermatology Images (Stanford), clinical photographs")
def _read_ddi(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    malignant = df["malignant"].str.strip().str.lower().map({"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0})
    disease = df["disease"].fillna("").str.strip().str.lower()
    stem = df["DDI_file"].str.strip().str.rsplit(".", n=1).str[0]
    return _frame(image_id=stem, source="ddi", year=YEARS["ddi"], diagnosis=disease, malignant=malignant,
                  melanoma=disease.str.contains("melanoma").astype(float).where(malignant.notna()),
                  fitzpatrick_group=df["skin_tone"].str.strip().map(DDI_SKIN_TONE))
