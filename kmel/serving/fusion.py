"""``predict --metadata``: the image + metadata fusion model (``kmel train fusion``) applied to predict's rows.

The user's table (CSV) has one row per image: an id column naming the file, and any of the columns the fusion
model reads (kmel's names as in build-records' metadata.csv — ``age``, ``sex``, ``site``, ``patient_id``, ISIC
2024's ``tbp_lv_*`` … — or the official ISIC names ``age_approx``, ``anatom_site_general``, HAM10000's
``localization``). Images are matched by the id column's value: the file's ``relpath`` as predict writes it, or its
name without folder and extension (``ISIC_0000001`` matches ``scans/ISIC_0000001.jpg``; an HDF5 member's key).

Patient-relative features compare a lesion with the same patient's other lesions, so the fused probability is
computed once every image has its image score: after the images, the output is read back, the rows with metadata
get the fused ``probability`` (and its decision at the fusion's threshold) and ``fused=True``, the others keep
the image model's result with ``fused=False``; ``image_probability`` always holds the image model's own. A rerun
recomputes the fusion from ``image_probability``, so a killed run resumes like any other.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.config import ConfigError
from kmel.models.fusion import FusionModel

ID_COLUMNS = ("relpath", "image", C.COL_IMAGE_ID, "isic_id", "image_name", "id", "file", "filename")
ALIASES = {"age_approx": C.COL_AGE, "anatom_site_general": C.COL_SITE, "anatom_site_general_challenge": C.COL_SITE,
           "localization": C.COL_SITE, "patient": C.COL_PATIENT, "lesion": C.COL_LESION}
FUSION_COLUMNS = ("image_probability", "fused")
MAX_TABLE_MB = 512


def _stem(name: str) -> str:
    """A file's name without folders and image extension (``a/b/ISIC_1.jpg`` → ``ISIC_1``; an HDF5 key as is)."""
    path = PurePosixPath(str(name).replace("\\", "/"))
    return path.stem if path.suffix.lower() in C.IMAGE_EXTENSIONS else path.name


def read_metadata_table(path: str | Path) -> tuple[pd.DataFrame, str]:
    """The user's metadata CSV as text columns (aliases renamed to kmel's names) and the name of its id column.

    Refused with a one-line error naming the file and the fix: missing, too large, not a CSV, no id column, an
    id listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--metadata {path}: no such file (a CSV with one row per image: an id column "
                          f"({', '.join(ID_COLUMNS)}) and the patients' data)")
    if path.stat().st_size > MAX_TABLE_MB * 2**20:
        raise ConfigError(f"--metadata {path} is over {MAX_TABLE_MB} MiB: split it, or keep only the inputs' rows")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=True, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise ConfigError(f"--metadata {path} is not a readable UTF-8 CSV ({str(exc).splitlines()[0]})") from None
    table.columns = [str(c).strip() for c in table.columns]
    table = table.rename(columns={a: n for a, n in ALIASES.items() if a in table.columns and n not in table.columns})
    key = next((c for c in ID_COLUMNS if c in table.columns), None)
    if key is None:
        raise ConfigError(f"--metadata {path} has no id column: name the column of image ids or file names one of "
                          f"{', '.join(ID_COLUMNS)} (its columns: {', '.join(map(str, table.columns[:12]))})")
    ids = table[key].map(lambda v: _stem(v.strip()) if isinstance(v, str) and v.strip() else None)
    if ids.isna().any():
        raise ConfigError(f"--metadata {path}: {int(ids.isna().sum())} row(s) with an empty {key!r}: every row needs "
                          "the id of its image")
    twice = sorted(set(ids[ids.duplicated()]))
    if twice:
        raise ConfigError(f"--metadata {path}: {len(twice)} id(s) listed more than once in {key!r} (e.g. "
                          f"{', '.join(twice[:3])}): one row per image")
    table.index = pd.Index(ids, name="_stem")
    return table, key


def match_rows(table: pd.DataFrame, relpaths: Sequence[str]) -> list[Any]:
    """The table row (its index label) of each relpath, or None."""
    known = set(table.index)
    return [stem if (stem := _stem(r)) in known else None for r in relpaths]


def check_matches(table: pd.DataFrame, key: str, path: str | Path, relpaths: Sequence[str]) -> int:
    """How many inputs the table describes; none at all is an error naming both sides' ids."""
    n = sum(m is not None for m in match_rows(table, relpaths))
    if relpaths and not n:
        ids = ", ".join(map(str, list(table.index[:3])))
        inputs = ", ".join(_stem(r) for r in relpaths[:3])
        raise ConfigError(f"--metadata {path} describes none of the {len(relpaths)} inputs: its {key!r} ids (e.g. "
                          f"{ids}) match no input file name (e.g. {inputs}); ids are file names without folder and "
                          "extension, or the relpath predict writes")
    return n


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def fuse_rows(
    rows: Sequence[dict[str, Any]], fusion: FusionModel, table: pd.DataFrame, image_threshold: float,
    decision_names: Sequence[str],
) -> tuple[list[dict[str, Any]], int]:
    """Rows with the fused probability where the table describes them (ok rows only); returns (rows, n fused).

    Every ok row's ``image_probability`` is the image model's probability; its ``probability``, ``prediction``,
    ``label`` and ``threshold`` are the fusion's (``fused=True``) or the image model's (``fused=False``).
    """
    out = [dict(r) for r in rows]
    ok = [i for i, r in enumerate(out) if r.get("status") == "ok"]
    for i in ok:
        row = out[i]
        image = _float(row.get("image_probability") if row.get("image_probability") not in (None, "") else
                       row.get("probability"))
        row.update(image_probability=image, probability=image, threshold=image_threshold, fused=False,
                   prediction=int(image >= image_threshold), label=decision_names[int(image >= image_threshold)])
    matched = [(i, m) for i, m in zip(ok, match_rows(table, [out[i]["relpath"] for i in ok])) if m is not None]
    if matched:
        features = table.loc[[m for _, m in matched]].reset_index(drop=True)
        image = np.array([out[i]["image_probability"] for i, _ in matched], dtype=np.float64)
        fused = fusion.predict(features, image)
        for (i, _), p in zip(matched, fused):
            decision = int(p >= fusion.threshold)
            out[i].update(probability=round(float(p), 6), threshold=fusion.threshold, prediction=decision,
                          label=decision_names[decision], fused=True)
    return out, len(matched)


def missing_columns(fusion: FusionModel, table: pd.DataFrame) -> tuple[str, ...]:
    """The fusion's columns the table lacks (their features are missing values: allowed, worth saying)."""
    return fusion.spec.missing_columns(table.columns)


def describe(fusion: FusionModel, table: pd.DataFrame, path: str | Path) -> Mapping[str, Any]:
    """What the table gives the fusion: refused when it has none of the columns the fusion reads."""
    missing = missing_columns(fusion, table)
    if fusion.spec.columns and len(missing) == len(fusion.spec.columns):
        raise ConfigError(f"--metadata {path} has none of the columns the fusion model reads "
                          f"({', '.join(fusion.spec.columns[:8])}): name them as in build-records' metadata.csv")
    return {"missing_columns": list(missing)}
