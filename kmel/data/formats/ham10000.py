"""HAM10000 (the ISIC 2018 Task 3 training set): ``HAM10000_metadata.csv`` with lesion ids, diagnosis, age, sex, site."""

from __future__ import annotations

import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.isic import MALIGNANT_2019
from kmel.data.formats.registry import _frame, register_format

HAM_DX = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC"}


@register_format("ham10000", ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"),
                 lambda h: {"lesion_id", "image_id", "dx", "dx_type"} <= set(h), about="HAM10000 metadata")
def _read_ham(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    diag = df["dx"].str.strip().str.lower().map(HAM_DX)
    mal = diag.isin(MALIGNANT_2019).astype(float).where(diag.notna())
    return _frame(image_id=df["image_id"], source="ham10000", year=2018, diagnosis=diag, malignant=mal,
                  melanoma=(diag == "MEL").astype(float).where(diag.notna()), lesion_id=df["lesion_id"],
                  age=pd.to_numeric(df.get("age"), errors="coerce"), sex=df.get("sex"), site=df.get("localization"))
