"""The ISIC challenge files 2016–2020 as published: ground truths (one-hot, header-less 2016, 2020 v1/v2),
metadata tables and the 2020 duplicate pairs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import _frame, _onehot, register_format

MALIGNANT_2018 = {"MEL", "BCC", "AKIEC", "AK"}


MALIGNANT_2019 = {"MEL", "BCC", "AK", "SCC"}


DIAGNOSIS_2020 = {
    "melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "SK", "lentigo nos": "BKL", "solar lentigo": "BKL",
    "lichenoid keratosis": "BKL", "cafe-au-lait macule": "CALM", "atypical melanocytic proliferation": "AMP",
    "unknown": "UNK",
}


ISIC_ID = re.compile(r"^ISIC_\d+")


def _is_2016(header: list[str]) -> bool:
    return bool(ISIC_ID.match(header[0])) and len(header) == 2


@register_format("isic2016", ("ISIC_0000000", "benign|malignant|0|1"), _is_2016,
                 about="ISIC 2016 ground truth, no header: id,benign|malignant or id,0.0|1.0")
def _read_2016(t: CsvTable) -> pd.DataFrame:
    raw = t.with_header_as_row(["image_id", "label"])
    label = raw["label"].str.strip().str.lower()
    if label.isin(["benign", "malignant"]).all():
        malignant = label.map({"benign": 0.0, "malignant": 1.0})
    else:
        malignant = pd.to_numeric(label, errors="coerce")
        malignant = malignant.where(malignant.isin([0.0, 1.0]))
    return _frame(image_id=raw["image_id"].str.strip(), source="isic2016", year=2016,
                  diagnosis=np.where(malignant == 1, "MEL", "BEN"), malignant=malignant, melanoma=malignant)


@register_format("isic2017", ("image_id", "melanoma", "seborrheic_keratosis"), about="ISIC 2017 Part 3 ground truth")
def _read_2017(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    mel = pd.to_numeric(df["melanoma"], errors="coerce")
    sk = pd.to_numeric(df["seborrheic_keratosis"], errors="coerce")
    diag = np.where(mel == 1, "MEL", np.where(sk == 1, "SK", "NV"))
    return _frame(image_id=df["image_id"], source="isic2017", year=2017, diagnosis=diag,
                  malignant=mel, melanoma=mel, keratosis=sk)


@register_format("isic2017_meta", ("image_id", "age_approximate", "sex"), role="meta", about="ISIC 2017 metadata")
def _read_2017_meta(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    return _frame(image_id=df["image_id"], source="isic2017", year=2017,
                  age=pd.to_numeric(df["age_approximate"], errors="coerce"), sex=df["sex"])


@register_format("isic2018", ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
                 lambda h: h == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"],
                 about="ISIC 2018 Task 3 ground truth (one-hot)")
def _read_2018(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    diag = _onehot(df, t.header[1:])
    mal = diag.isin(MALIGNANT_2018).astype(float).where(diag.notna())
    return _frame(image_id=df["image"], source="isic2018", year=2018, diagnosis=diag.replace({"AKIEC": "AK"}),
                  malignant=mal, melanoma=(diag == "MEL").astype(float).where(diag.notna()))


@register_format("isic2019", ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"), "prefix",
                 about="ISIC 2019 ground truth (one-hot)")
def _read_2019(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    diag = _onehot(df, t.header[1:10])
    known = diag.notna() & (diag != "UNK")
    return _frame(image_id=df["image"], source="isic2019", year=2019, diagnosis=diag,
                  malignant=diag.isin(MALIGNANT_2019).astype(float).where(known),
                  melanoma=(diag == "MEL").astype(float).where(known))


@register_format("isic2019_meta", ("image", "age_approx", "anatom_site_general", "lesion_id", "sex"), role="meta",
                 about="ISIC 2019 training metadata")
def _read_2019_meta(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    return _frame(image_id=df["image"], source="isic2019", year=2019,
                  age=pd.to_numeric(df["age_approx"], errors="coerce"),
                  sex=df["sex"], site=df["anatom_site_general"], lesion_id=df["lesion_id"])


@register_format("isic2019_test_meta", ("image", "age_approx", "anatom_site_general", "sex"), role="unused",
                 about="ISIC 2019 test metadata (no labels)")
def _read_2019_test_meta(t: CsvTable) -> pd.DataFrame:
    return _frame(image_id=t.rows["image"], source="isic2019", year=2019)


def _read_2020(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    target = pd.to_numeric(df["target"], errors="coerce")
    target = target.where(target.isin([0.0, 1.0]))
    diag = df["diagnosis"].fillna("unknown").str.strip().str.lower().map(DIAGNOSIS_2020).fillna("UNK")
    return _frame(image_id=df["image_name"], source="isic2020", year=2020, diagnosis=diag, malignant=target,
                  melanoma=target, keratosis=(diag == "SK").astype(float).where(diag != "UNK"),
                  patient_id=df["patient_id"], lesion_id=df.get("lesion_id"),
                  age=pd.to_numeric(df["age_approx"], errors="coerce"), sex=df["sex"],
                  site=df["anatom_site_general_challenge"])


_COLUMNS_2020 = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
                 "benign_malignant", "target")

register_format("isic2020_v2", _COLUMNS_2020 + ("lesion_id",), "subset", about="ISIC 2020 ground truth v2")(_read_2020)
register_format("isic2020_v1", _COLUMNS_2020, "subset", about="ISIC 2020 ground truth")(_read_2020)


@register_format("duplicates2020", ("image_name_1", "image_name_2"), lambda h: h == ["image_name_1", "image_name_2"],
                 role="duplicates", about="ISIC 2020 duplicate pairs")
def _read_2020_duplicates(t: CsvTable) -> pd.DataFrame:
    return pd.DataFrame({"keep": t.rows["image_name_1"], "drop": t.rows["image_name_2"]})
