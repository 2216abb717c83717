"""ISIC Archive exports (``isic-cli`` metadata.csv): ``diagnosis_1`` or the older ``benign_malignant``, the most\nspecific diagnosis name, patient and lesion ids, annotated Fitzpatrick type; indeterminate and non-dermoscopic rows\nare marked to be dropped and counted."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kmel.data.diagnosis import most_specific_code
from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import YEARS, _frame, register_format

FITZPATRICK_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}


@register_format("isic_archive", ("isic_id", "diagnosis_1", "benign_malignant", "image_type", "patient_id", "lesion_id",
                                  "age_approx", "sex", "anatom_site_general", "fitzpatrick_skin_type"),
                 lambda h: "isic_id" in h and bool({"diagnosis_1", "benign_malignant"} & set(h)),
                 about="ISIC Archive export (isic-cli metadata.csv)")
def _read_isic_archive(t: CsvTable) -> pd.DataFrame:
    """ISIC Archive export: ``diagnosis_1`` (Benign/Malignant/Indeterminate) or older ``benign_malignant``."""
    df = t.rows
    empty = pd.Series(np.nan, index=df.index, dtype=object)
    if "diagnosis_1" in df:
        verdict = df["diagnosis_1"].str.strip().str.lower()
        older = df.get("benign_malignant", empty).str.strip().str.lower()
        verdict = verdict.where(verdict.notna(), older)
    else:
        verdict = df["benign_malignant"].str.strip().str.lower()
    malignant = verdict.map({"benign": 0.0, "malignant": 1.0})
    # The most specific diagnosis named: diagnosis_5 .. diagnosis_2, else the older diagnosis column.
    diag = most_specific_code([df[c] for c in ("diagnosis_5", "diagnosis_4", "diagnosis_3", "diagnosis_2",
                                               "diagnosis") if c in df] or [empty])
    known = diag != "UNK"
    melanoma = (diag == "MEL").astype(float).where(known | (malignant == 0))
    image_type = df.get("image_type", empty).str.strip().str.lower()
    reason = pd.Series(np.nan, index=df.index, dtype=object)
    reason[verdict.fillna("").str.startswith("indeterminate")] = "indeterminate diagnosis (ISIC archive)"
    reason[image_type.notna() & (image_type != "dermoscopic")] = "not dermoscopic (ISIC archive image_type)"
    fitz = df.get("fitzpatrick_skin_type", empty).str.strip().str.upper()
    fitz = fitz.map(FITZPATRICK_ROMAN).fillna(pd.to_numeric(fitz, errors="coerce"))
    fitz = fitz.where(fitz.between(1, 6), -1).fillna(-1).astype(int)
    return _frame(image_id=df["isic_id"], source="isic_archive", year=YEARS["isic_archive"],
                  diagnosis=diag, malignant=malignant,
                  melanoma=melanoma.where(malignant.notna()),
                  keratosis=(diag == "SK").astype(float).where(known), patient_id=df.get("patient_id"),
                  lesion_id=df.get("lesion_id"), age=pd.to_numeric(df.get("age_approx"), errors="coerce"),
                  sex=df.get("sex"), site=df.get("anatom_site_general"), fitzpatrick=fitz, drop_reason=reason)
