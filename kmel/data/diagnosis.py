"""Diagnosis classes: every source's diagnosis names mapped onto one class list (the ``diagnosis`` task).

``metadata.csv`` keeps each source's diagnosis as kmel reads it: a code for the ISIC challenge files, HAM10000
and the ISIC Archive (MEL, NV, BCC, AK, SCC, BKL, SK, DF, VASC, UNK, …) and the source's own words for
Fitzpatrick17k and DDI (``basal cell carcinoma``, ``melanocytic-nevi``). :func:`diagnosis_classes` turns either
into one of the profile's classes (``records.classes``; by default the eight ISIC 2019 classes,
:data:`kmel.constants.DIAGNOSIS_CLASSES`) or into a reason
the row has no class. docs/data.md, "Diagnosis classes", is this table in prose; change both together.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

# Codes (upper case, as the format readers write them) to a class; None: no class (the row is dropped).
CODE_CLASS: dict[str, str | None] = {
    "MEL": "MEL", "NV": "NV", "BCC": "BCC", "AK": "AK", "AKIEC": "AK", "SCC": "SCC",
    # ISIC 2019's BKL ("benign keratosis") lumps seborrheic keratosis, solar lentigo and lichen-planus-like keratosis.
    "BKL": "BKL", "SK": "BKL", "DF": "DF", "VASC": "VASC",
    # No diagnosis to learn from: ISIC 2016's benign (nevus or keratosis, unsaid), unknown, custom benign/malignant,
    # ISIC 2020's café-au-lait macule and atypical melanocytic proliferation (neither is an ISIC 2019 class).
    "BEN": None, "UNK": None, "BENIGN": None, "MALIGNANT": None, "CALM": None, "AMP": None,
}

# Words (lower case, hyphens and underscores read as spaces) to a code; the first fragment found wins, so the
# exceptions come before the general words (an epidermal or Becker nevus is not a melanocytic nevus, lentigo
# maligna is a melanoma, lichen planus is not a keratosis).
NAME_FRAGMENTS: tuple[tuple[str, str | None], ...] = (
    ("lentigo maligna", "MEL"), ("melanoma", "MEL"),
    ("basal cell", "BCC"), ("squamous cell", "SCC"), ("bowen", "SCC"),
    ("actinic", "AK"), ("solar keratosis", "AK"),
    ("seborrh", "SK"), ("benign keratosis", "BKL"), ("solar lentigo", "BKL"), ("lentigo", "BKL"), ("lichenoid", "BKL"),
    ("lichen planus like", "BKL"),
    ("epidermal nevus", None), ("becker", None), ("sebaceous", None), ("lipomatosus", None),
    ("not melanocytic nevus", None),  # the ISIC hierarchy's "Flat melanotic pigmentations - not melanocytic nevus"
    ("nevus", "NV"), ("nevi", "NV"),
    ("dermatofibroma", "DF"),
    ("kaposi", None), ("angioma", "VASC"), ("angiokeratoma", "VASC"), ("vascular", "VASC"), ("pyogenic", "VASC"),
    ("port wine", "VASC"),
)


def match_name(name: str) -> tuple[bool, str | None]:
    """(whether a fragment of :data:`NAME_FRAGMENTS` is in ``name``, the code it gives — None for a name that is
    deliberately no class, such as an epidermal nevus)."""
    text = " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())
    for fragment, code in NAME_FRAGMENTS:
        if fragment in text:
            return True, code
    return False, None


def code_for_name(name: str) -> str | None:
    """The code of a diagnosis written in words (``"basal-cell-carcinoma"`` → ``"BCC"``); None when no fragment
    of :data:`NAME_FRAGMENTS` is in it or the first one found names no class."""
    return match_name(name)[1]


def most_specific_code(levels: Sequence[pd.Series]) -> pd.Series:
    """One code per row from an ISIC diagnosis hierarchy (the Archive's ``diagnosis_5`` … ``diagnosis_2``, ISIC
    2024's ``iddx_5`` … ``iddx_2``), most specific level first: the first non-empty level that a fragment matches
    decides (a match that names no class gives UNK, without looking at broader levels: a Kaposi sarcoma filed
    under "vascular proliferations" is not a VASC lesion); a level no fragment matches defers to the next; UNK
    when none decides."""
    def decide(names: Sequence[object]) -> str:
        for name in names:
            if isinstance(name, str) and name.strip():
                matched, code = match_name(name)
                if matched:
                    return code or "UNK"
        return "UNK"

    if not levels:
        raise ValueError("no diagnosis levels given")
    frame = pd.concat(list(levels), axis=1)
    return pd.Series([decide(row) for row in frame.itertuples(index=False)], index=frame.index, dtype=object)


def diagnosis_class(value: object) -> str | None:
    """One ``diagnosis`` cell (a code or words) → one of :data:`kmel.constants.DIAGNOSIS_CLASSES`, or None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    if text.upper() in CODE_CLASS:
        return CODE_CLASS[text.upper()]
    code = code_for_name(text)
    return CODE_CLASS.get(code) if code else None


def diagnosis_classes(diagnosis: pd.Series, classes: Sequence[str]) -> tuple[pd.Series, pd.Series]:
    """(class index into ``classes`` or -1, reason for -1 or NaN) for each ``diagnosis`` cell."""
    names = diagnosis.map(diagnosis_class)
    index = {c: i for i, c in enumerate(classes)}
    target = names.map(lambda c: index.get(c, -1) if c else -1).astype(int)
    reason = pd.Series(pd.NA, index=diagnosis.index, dtype=object)
    reason[names.isna()] = "diagnosis names none of the classes (unknown, benign unspecified, or not an ISIC 2019 class)"
    reason[names.notna() & (target < 0)] = names[names.notna() & (target < 0)].map(
        lambda c: f"class {c} not in records.classes")
    return target, reason
