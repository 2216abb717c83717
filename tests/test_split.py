"""The train/val/test split keeps every lesion (HAM10000, ISIC 2019/2020 ``lesion_id``) in one split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.data.metadata import split_table


def _lesion_table(seed: int = 0) -> pd.DataFrame:
    """300 lesions with 1-6 images each and no patient id (as HAM10000 and most of ISIC 2019)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lesion in range(300):
        target, tone = int(rng.uniform() < 0.2), int(rng.integers(0, 5))
        source = "ham10000" if lesion % 2 else "isic2019"
        for k in range(int(rng.integers(1, 7))):
            # Images of one lesion can differ in skin tone (lighting): the group must still hold.
            rows.append({C.COL_IMAGE_ID: f"ISIC_{lesion:04d}_{k}", C.COL_LESION: f"HAM_{lesion:07d}",
                         C.COL_PATIENT: None, C.COL_SOURCE: source, C.COL_TARGET: target,
                         C.COL_SKIN_TONE: (tone + k % 2) % 5})
    return pd.DataFrame(rows)


def test_no_lesion_in_two_splits():
    table = _lesion_table()
    for seed in (0, 1, 2):
        split = split_table(table, 0.15, 0.15, seed=seed)
        per_lesion = split.groupby(C.COL_LESION)[C.COL_SPLIT].nunique()
        assert (per_lesion == 1).all(), per_lesion[per_lesion > 1].index.tolist()[:5]
        shares = split[C.COL_SPLIT].value_counts(normalize=True)
        assert set(shares.index) == set(C.SPLITS) and abs(shares["train"] - 0.7) < 0.1


def test_patient_wins_over_lesion_and_rows_without_either_split_alone():
    table = _lesion_table(1)
    # ISIC 2020: one patient, several lesions: the whole patient stays together.
    table.loc[table[C.COL_LESION].isin([f"HAM_{i:07d}" for i in range(10)]), C.COL_PATIENT] = "IP_1"
    table.loc[table.index[-40:], C.COL_LESION] = None  # images with no lesion id: each its own group
    split = split_table(table, 0.2, 0.2, seed=5)
    assert split.loc[split[C.COL_PATIENT] == "IP_1", C.COL_SPLIT].nunique() == 1
    with_lesion = split[split[C.COL_LESION].notna()]
    assert (with_lesion.groupby(C.COL_LESION)[C.COL_SPLIT].nunique() == 1).all()
    assert split.loc[split[C.COL_LESION].isna(), C.COL_SPLIT].nunique() > 1
