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
