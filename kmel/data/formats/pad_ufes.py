"""PAD-UFES-20 (smartphone photographs from Brazil, RGBA PNGs) metadata as published.

``diagnostic``: BCC, SCC (Bowen's disease included), MEL are malignant, as the publishers define it; ACK (actinic
keratosis), SEK (seborrheic keratosis) and NEV are benign. Note that kmel's ISIC 2018 / HAM10000 rule counts actinic
keratoses (AKIEC) as malignant: the binary label follows each publisher, and the diagnosis task maps ACK to the AK
class, whose malignancy is the profile's ``records.malignant_classes``. ``fitspatrick`` (the dataset's own
spelling) is the annotated Fitzpatrick type 1–6; ``gender`` and ``region`` feed the subgroups. The clinical history
columns (``smoke`` .. ``elevation``, ``diameter_1/2``, ``biopsed``) are kept under their published names for image +
metadata fusion. These are clinical photographs, not dermoscopy: the source is evaluation-only by default
(``records.eval_only_sources``), as DDI; docs/data.md says why.
"""

from __future__ import annotations

import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import YEARS, _frame, register_format

PAD_DIAGNOSIS = {"BCC": "BCC", "SCC": "SCC", "MEL": "MEL", "ACK": "AK", "SEK": "SK", "NEV": "NV"}
PAD_MALIGNANT = {"BCC", "SCC", "MEL"}
CLINICAL_COLUMNS = ("smoke", "drink", "background_father", "background_mother", "pesticide", "skin_cancer_history",
                    "cancer_history", "has_piped_water", "has_sewage_system", "diameter_1", "diameter_2", "itch",
                    "grew", "hurt", "changed", "bleed", "elevation", "biopsed")


@register_format("pad_ufes20", ("patient_id", "lesion_id", "fitspatrick", "region", "diagnostic", "img_id"), "subset",
                 about="PAD-UFES-20 metadata (smartphone photographs)")
def _read_pad(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    missing = pd.Series(pd.NA, index=df.index, dtype=object)
    code = df["diagnostic"].fillna("").str.strip().str.upper()
    diag = code.map(PAD_DIAGNOSIS).fillna("UNK")
    known = diag != "UNK"
    malignant = code.isin(PAD_MALIGNANT).astype(float).where(known)
    extra = df[[c for c in CLINICAL_COLUMNS if c in df]].copy()
    for col in ("diameter_1", "diameter_2"):
        if col in extra:
            extra[col] = pd.to_numeric(extra[col], errors="coerce")
    fitz = pd.to_numeric(df["fitspatrick"], errors="coerce")
    # Lesion ids are numbers that restart per dataset: prefixed, so they cannot meet another source's ids.
    lesion = "PAD_" + df["lesion_id"].fillna("").str.strip()
    return _frame(extra=extra, image_id=df["img_id"].str.strip().str.rsplit(".", n=1).str[0], source="pad_ufes20",
                  year=YEARS["pad_ufes20"], diagnosis=diag, malignant=malignant,
                  melanoma=(diag == "MEL").astype(float).where(known), keratosis=(diag == "SK").astype(float).where(known),
                  patient_id=df["patient_id"].str.strip(), lesion_id=lesion.where(df["lesion_id"].notna()),
                  age=pd.to_numeric(df.get("age", missing), errors="coerce"), sex=_lower(df.get("gender", missing)),
                  site=_lower(df["region"]), fitzpatrick=fitz.where(fitz.between(1, 6), -1))


def _lower(column: pd.Series) -> pd.Series:
    return column.astype(object).where(column.isna(), column.astype(str).str.strip().str.lower())
