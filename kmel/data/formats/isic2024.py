"""ISIC 2024 challenge (SLICE-3D: crops of 3D total-body photographs, ``train-image.hdf5``) metadata as published.

``train-metadata.csv`` (with ``target``): the label is ``target`` (1 = malignant, the challenge's own definition;
indeterminate lesions are 0 there and stay 0 here); the diagnosis is the most specific of ``iddx_5`` .. ``iddx_2``
that names a class (:func:`kmel.data.diagnosis.code_for_name`), else UNK. ``patient_id`` and ``lesion_id`` group
the split. ``test-metadata.csv`` (no ``target``): every row is unlabelled, dropped from records and counted under
its own reason (``kmel predict`` scores such images).

Kept for image + metadata fusion, under their published names: the columns present in *both* files, the
``tbp_lv_*`` lesion measurements, ``clin_size_long_diam_mm``, ``image_type``, ``tbp_tile_type`` and ``attribution``
(the clinic). Train-only columns (``iddx_*``, ``mel_thick_mm``, ``mel_mitotic_index``,
``tbp_lv_dnn_lesion_confidence``) are not: they are absent when a model is used, and the first three describe
the pathology result itself.
"""

from __future__ import annotations

import pandas as pd

from kmel.data.diagnosis import most_specific_code
from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import COL_DROP_REASON, YEARS, _frame, register_format

# Present in the train and the test metadata, and not a label: what a fusion model may read.
FEATURE_COLUMNS = ("clin_size_long_diam_mm", "image_type", "tbp_tile_type", "attribution")
FEATURE_PREFIX = "tbp_lv_"
TRAIN_ONLY = ("tbp_lv_dnn_lesion_confidence",)
UNLABELLED = "unlabelled (ISIC 2024 test metadata, no target): not in records; `kmel predict` scores these images"


def _is_2024(header: list[str], train: bool) -> bool:
    cols = set(header)
    return {"isic_id", "patient_id", "tbp_tile_type"} <= cols and ("target" in cols) == train


def _features(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if (c.startswith(FEATURE_PREFIX) and c not in TRAIN_ONLY) or c in FEATURE_COLUMNS]
    out = df[keep].copy()
    for col in keep:
        numbers = pd.to_numeric(out[col], errors="coerce")
        if numbers.notna().sum() == out[col].notna().sum():  # numeric as published: keep as numbers
            out[col] = numbers
    return out


def _diagnosis(df: pd.DataFrame) -> pd.Series:
    """The most specific ``iddx_*`` level that names a class, as a code (the ISIC Archive's rule); UNK when none does."""
    levels = [df[c] for c in ("iddx_5", "iddx_4", "iddx_3", "iddx_2") if c in df]
    return most_specific_code(levels) if levels else pd.Series("UNK", index=df.index, dtype=object)


def _rows(df: pd.DataFrame, **columns) -> pd.DataFrame:
    age = pd.to_numeric(df.get("age_approx"), errors="coerce")
    return _frame(extra=_features(df), image_id=df["isic_id"].str.strip(), source="isic2024", year=YEARS["isic2024"],
                  patient_id=df["patient_id"], age=age, sex=df.get("sex"), site=df.get("anatom_site_general"),
                  **columns)


@register_format("isic2024", ("isic_id", "target", "patient_id", "tbp_tile_type"),
                 lambda h: _is_2024(h, train=True), about="ISIC 2024 (SLICE-3D) training metadata")
def _read_2024(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    target = pd.to_numeric(df["target"], errors="coerce")
    target = target.where(target.isin([0.0, 1.0]))
    diag = _diagnosis(df)
    known = diag != "UNK"
    melanoma = (diag == "MEL").astype(float).where(known | (target == 0))
    return _rows(df, diagnosis=diag, malignant=target, melanoma=melanoma.where(target.notna()),
                 keratosis=diag.isin(["SK"]).astype(float).where(known), lesion_id=df.get("lesion_id"))


@register_format("isic2024_test", ("isic_id", "patient_id", "tbp_tile_type"), lambda h: _is_2024(h, train=False),
                 about="ISIC 2024 (SLICE-3D) test metadata (no labels)")
def _read_2024_test(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    return _rows(df, diagnosis="UNK", **{COL_DROP_REASON: UNLABELLED})
