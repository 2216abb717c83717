"""Your own labels: a plain ``image_id,label`` (or ``image,target``) table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.registry import YEARS, _frame, register_format


def _is_custom(header: list[str]) -> bool:
    return len(header) == 2 and header[0] in ("image_id", "image") and header[1] in ("label", "target")


@register_format("custom", ("image_id", "label"), _is_custom, about="your own image_id,label (or image,target) table")
def _read_custom(t: CsvTable) -> pd.DataFrame:
    df, (key, value) = t.rows, t.header
    label = df[value].fillna("").str.strip().str.lower()
    mal = label.map({"benign": 0.0, "malignant": 1.0, "0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0})
    return _frame(image_id=df[key], source="custom", year=YEARS["custom"],
                  diagnosis=np.where(mal == 1, "MALIGNANT", "BENIGN"), malignant=mal)
