"""Shared bits of the benchmarks: where the real data is, timing, a staging folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO))


def require_shared() -> Path:
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the benchmarks read the real data in ../shared/data")
    return SHARED


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def stage_isic2018_as_2019(dest: Path, limit: int | None = None, split: str | None = None) -> Path:
    """Lay the 2,594 real 256 px images out as a 2019 image folder beside the real 2019 CSV.

    Symlinks only (nothing copied); masks go under masks/. Most 2019 rows then have no image,
    as for a user with a partial download.
    """
    import pandas as pd

    src = require_shared()
    labels = pd.read_csv(src / "isic2018-task1-256" / "labels.csv")
    if split:
        labels = labels[labels["split"] == split]
    if limit:
        labels = labels.head(limit)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        link = dest / name
        if not link.exists():
            link.symlink_to(src / "metadata" / name)
    for image_id in labels["image_id"]:
        for folder, suffix in (("images", ".jpg"), ("masks", "_segmentation.png")):
            link = dest / folder / f"{image_id}{suffix}"
            if not link.exists():
                link.symlink_to(src / "isic2018-task1-256" / folder / f"{image_id}{suffix}")
    return dest


def stage_union(dest: Path) -> Path:
    """The ISIC 2018 Task 1 images (as a 2019 folder) plus all 10,015 HAM10000 images and masks, with
    ``HAM10000_metadata.csv`` beside the 2019 CSVs. Symlinks only. ISIC 2019 re-publishes the HAM images,
    so build-records keeps their 2019 rows (newest source) and drops the HAM copies as duplicates;
    :func:`union_split` gives them back their origin."""
    src = require_shared()
    stage_isic2018_as_2019(dest)
    link = dest / "HAM10000_metadata.csv"
    if not link.exists():
        link.symlink_to(src / "metadata" / "HAM10000_metadata.csv")
    for folder, pattern in (("images", "*.jpg"), ("masks", "*_segmentation.png")):
        (dest / folder / "ham").mkdir(parents=True, exist_ok=True)
        for path in (src / "ham10000" / folder).glob(pattern):
            target = dest / folder / "ham" / path.name
            if not target.exists():
                target.symlink_to(path)
    return dest


def union_split(table, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42):
    """Split of the union benchmark: the ISIC 2018 Task 1 images keep the fixed 1,600 / 400 / 594
    partition of labels.csv (today's figures stay comparable); the HAM10000 images are split by kmel's
    own grouped split on their ``lesion_id`` (several images per lesion), 70 / 15 / 15, and their
    ``source`` is set to ``ham10000`` (their origin) so that reports and balancing can tell them apart."""
    import pandas as pd

    from kmel import constants as C
    from kmel.data.metadata import split_table

    src = require_shared()
    fixed = pd.read_csv(src / "isic2018-task1-256" / "labels.csv").set_index("image_id")["split"]
    # The HAM10000 split is stratified on malignant or not whatever the task, so that a diagnosis run and a
    # yes/no run on the union train and test on the same images (for the yes/no task target == malignant).
    ham = pd.read_csv(src / "metadata" / "HAM10000_metadata.csv").set_index("image_id")["lesion_id"]
    table = table.copy()
    base = table["base_id"] if "base_id" in table else table[C.COL_IMAGE_ID]
    is_ham = base.isin(ham.index)
    table.loc[is_ham, C.COL_SOURCE] = "ham10000"
    table.loc[is_ham, C.COL_LESION] = base[is_ham].map(ham)
    table[C.COL_SPLIT] = base.map(fixed)
    if is_ham.any():
        ham = table[is_ham].drop(columns=C.COL_SPLIT)
        by_malignant = ham.assign(**{C.COL_TARGET: ham[C.COL_MALIGNANT].astype(int)})
        ham_part = split_table(by_malignant, val_fraction, test_fraction, seed, ())
        table.loc[is_ham, C.COL_SPLIT] = ham_part[C.COL_SPLIT]
    missing = table[C.COL_SPLIT].isna()
    if missing.any():
        raise SystemExit(f"{int(missing.sum())} images have no split: {table.loc[missing, C.COL_IMAGE_ID].tolist()[:5]}")
    return table


def build_benchmark_records(out: Path, config, data: str = "isic") -> Path:
    """Records for a benchmark: ``isic`` (the 2,594 256 px images, fixed split) or ``union`` (those plus
    all of HAM10000, :func:`union_split`)."""
    import kmel.data.records as records

    def fixed_split(table, *args, **kwargs):
        return union_split(table)

    original = records.split_table
    records.split_table = fixed_split
    try:
        staged = stage_union(out / "data") if data == "union" else stage_isic2018_as_2019(out / "data")
        records.build_records(staged, out / "records", config, progress=True)
    finally:
        records.split_table = original
    return out / "records"


def per_source(table, threshold: float) -> dict[str, dict]:
    """AUC, partial AUC above 80 % TPR, and sensitivity / specificity at ``threshold``, per ``source`` of a scored table (``target``,
    ``probability``: a report's predictions.csv or :func:`kmel.evaluation.evaluate.predict_records`). A
    diagnosis model's table (``true_class`` and ``p_<CLASS>`` columns) adds the balanced multiclass accuracy
    and each class's recall, of its ``diagnosis`` column (the models' decision, in a report's predictions.csv)
    where it has one, else of the arg-max class, and the plain arg-max's balanced accuracy beside it."""
    from sklearn.metrics import roc_auc_score

    from kmel.evaluation.diagnosis import diagnosis_metrics
    from kmel.evaluation.fairness import partial_auc

    classes = [c[2:] for c in table.columns if c.startswith("p_")]

    out = {}
    for source, part in table.groupby("source"):
        y, p = part["target"].to_numpy(), part["probability"].to_numpy()
        pos, neg = y == 1, y == 0
        out[source] = {
            "n": int(len(part)), "malignant": int(pos.sum()),
            "auc": round(float(roc_auc_score(y, p)), 4) if pos.any() and neg.any() else None,
            "pauc80": round(partial_auc(y, p), 4) if pos.any() and neg.any() else None,
            "sensitivity": round(float((p[pos] >= threshold).mean()), 4) if pos.any() else None,
            "specificity": round(float((p[neg] < threshold).mean()), 4) if neg.any() else None,
        }
        if classes and "true_class" in part:
            decided = part["diagnosis"].map(classes.index).to_numpy() if "diagnosis" in part else None
            m = diagnosis_metrics(part["true_class"], part[[f"p_{c}" for c in classes]].to_numpy(), classes, decided)
            out[source]["balanced_multiclass_accuracy"] = round(m["balanced_accuracy"], 4)
            out[source]["argmax_balanced_multiclass_accuracy"] = round(m["argmax_balanced_accuracy"], 4)
            out[source]["recall_by_class"] = {c: (None if v["sensitivity"] is None else round(v["sensitivity"], 4))
                                              for c, v in m["per_class"].items()}
    return out


def crops_trained_on(records: Path, fingerprint: str) -> Path:
    """The crop-record folder under ``records`` whose manifest has ``fingerprint`` (a classifier's
    ``records_fingerprint``): the crops a trained classifier learned from, whatever their folder is called."""
    import json

    for manifest in sorted(Path(records).glob("crops-*/manifest.json")):
        if json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
            return manifest.parent
    raise SystemExit(f"no crop records with fingerprint {fingerprint} under {records}: the crops the model trained "
                     "on were rebuilt since; run bench/cls_quality.py again")
