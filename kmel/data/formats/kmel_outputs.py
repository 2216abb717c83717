"""kmel's own tables (records' metadata.csv and skipped.csv, predict output, a report's predictions.csv,
synthetic_truth.csv): recognised by their columns, or by the folder kmel wrote them to, and never read as data."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from kmel import constants as C
from kmel.data.formats.registry import register_format

# Folders kmel writes (records, saved models) hold one of these, with a "kmel_version" in it.
KMEL_OUTPUT_MARKERS = (C.MANIFEST, "pipeline.json")


def _kmel_output(kind: str, columns: Sequence[str], about: str, match: str = "subset") -> None:
    read = register_format(kind, columns, match, role="kmel_output", about=f"{about}, written by kmel")
    read(lambda t: pd.DataFrame())


# kmel's own tables, known by their columns wherever they are copied to.
_kmel_output("kmel_records_metadata", ("image_id", "source", "split", "image_path"), "metadata.csv of build-records")
_kmel_output("kmel_skipped", ("image_id", "path", "reason"), "skipped.csv of build-records", "exact")
_kmel_output("kmel_predict", ("image", "relpath", "path", "probability", "status"), "the output of predict")
_kmel_output("kmel_report_predictions", ("image_id", "target", "probability", "prediction"),
             "a report's predictions.csv")
_kmel_output("kmel_synthetic_truth", ("image_id", "skin_tone", "malignant", "hair"), "synthetic_truth.csv", "exact")


def in_kmel_output_folder(path: Path, seen: dict[Path, bool]) -> bool:
    """Whether ``path`` sits in a folder kmel wrote (a records or models folder, by its manifest)."""
    folder = path.parent
    if folder not in seen:
        seen[folder] = False
        for marker in KMEL_OUTPUT_MARKERS:
            try:
                if (folder / marker).is_file() and '"kmel_version"' in (folder / marker).read_text(errors="replace"):
                    seen[folder] = True
            except OSError:
                pass
    return seen[folder]
