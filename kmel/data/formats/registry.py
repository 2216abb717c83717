"""The format registry: each known metadata CSV is one reader registered with the header that identifies it
(tried in registration order), and every reader returns the same standard columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.data.formats.csvread import CsvTable, read_csv_table

# Fitzpatrick type as I-II / III-IV / V-VI: the only resolution DDI publishes, filled for every annotated source.
COL_FITZPATRICK_GROUP = "fitzpatrick_group"


# Why a reader rejects a row it read (indeterminate, not dermoscopic); dropped and counted by load_metadata.
COL_DROP_REASON = "drop_reason"


STANDARD_COLUMNS = [
    C.COL_IMAGE_ID, C.COL_SOURCE, C.COL_YEAR, C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA, C.COL_KERATOSIS,
    C.COL_PATIENT, C.COL_LESION, C.COL_AGE, C.COL_SEX, C.COL_SITE, C.COL_FITZPATRICK, COL_FITZPATRICK_GROUP, "base_id",
]


YEARS = {"isic2016": 2016, "isic2017": 2017, "isic2018": 2018, "ham10000": 2018, "isic2019": 2019,
         "isic2020": 2020, "pad_ufes20": 2020, "fitzpatrick17k": 2021, "ddi": 2021, "isic2024": 2024,
         "isic_archive": 2024, "custom": 2100}


def _frame(extra: pd.DataFrame | None = None, **columns: Any) -> pd.DataFrame:
    """The standard columns from ``columns`` (a value or one per row), then ``extra``'s columns as published (the
    clinical and lesion measurements a source ships for image + metadata fusion, e.g. ISIC 2024's ``tbp_lv_*``)."""
    n = max((len(v) for v in columns.values() if isinstance(v, (list, np.ndarray, pd.Series))), default=0)
    data = {}
    names = STANDARD_COLUMNS + ([COL_DROP_REASON] if COL_DROP_REASON in columns else [])
    for name in names:
        value = columns.get(name, np.nan)
        data[name] = list(value) if isinstance(value, (list, np.ndarray, pd.Series)) else [value] * n
    df = pd.DataFrame(data)
    df["base_id"] = df[C.COL_IMAGE_ID].astype(str).str.replace("_downsampled", "", regex=False)
    if extra is not None:
        extra = extra.drop(columns=[c for c in extra.columns if c in df.columns]).reset_index(drop=True)
        df = pd.concat([df, extra], axis=1)
    return df


def _onehot(df: pd.DataFrame, classes: list[str]) -> pd.Series:
    values = df[classes].apply(pd.to_numeric, errors="coerce")
    diag = values.idxmax(axis=1)
    diag[values.max(axis=1).fillna(0) <= 0] = np.nan
    return diag


@dataclass(frozen=True)
class CsvFormat:
    """A known metadata CSV: the header that identifies it and the function that normalises it.

    ``match``: ``exact`` (same column set), ``subset`` (these columns among others), ``prefix`` (the
    header starts with these columns in order), or a function of the header. ``role``: ``labels``
    (rows with labels), ``meta`` (age/sex/site to merge), ``unused`` (known, nothing to take),
    ``duplicates`` (pairs), ``kmel_output`` (a file kmel wrote: never read as data).
    """

    kind: str
    columns: tuple[str, ...]
    match: str | Callable[[list[str]], bool]
    role: str
    read: Callable[[CsvTable], pd.DataFrame]
    about: str

    def matches(self, header: list[str]) -> bool:
        if callable(self.match):
            return self.match(header)
        cols = set(header)
        if self.match == "exact":
            return cols == set(self.columns)
        if self.match == "subset":
            return set(self.columns) <= cols
        return tuple(header[: len(self.columns)]) == self.columns


FORMATS: dict[str, CsvFormat] = {}


def register_format(
    kind: str, columns: Sequence[str], match: str | Callable[[list[str]], bool] = "exact",
    role: str = "labels", about: str = "",
) -> Callable[[Callable[[CsvTable], pd.DataFrame]], Callable[[CsvTable], pd.DataFrame]]:
    """Decorator: register ``read`` for CSVs whose header matches; formats are tried in registration order."""

    def decorator(read: Callable[[CsvTable], pd.DataFrame]) -> Callable[[CsvTable], pd.DataFrame]:
        if kind in FORMATS:
            raise ValueError(f"format {kind!r} registered twice")
        FORMATS[kind] = CsvFormat(kind, tuple(columns), match, role, read, about or (read.__doc__ or "").strip())
        return read

    return decorator


def identify_format(header: list[str]) -> CsvFormat | None:
    """The first registered format whose header signature matches, or None."""
    return next((f for f in FORMATS.values() if f.matches(header)), None)


def resembles(header: list[str]) -> str | None:
    """For an unknown header: the known format sharing the most columns (at least two, and half of the
    smaller header), ignoring letter case, and what differs; None when no format is that close."""
    got = {h.strip().lower() for h in header}
    best, best_score = None, (0.0, 0.0)
    for fmt in FORMATS.values():
        want = {c.lower() for c in fmt.columns}
        shared = len(got & want)
        score = (shared / min(len(got), len(want)), shared / len(got | want))
        if shared >= 2 and score[0] >= 0.5 and score > best_score:
            best, best_score = fmt, score
    if best is None:
        return None
    missing = [c for c in best.columns if c not in header]
    extra = [h for h in header if h not in best.columns]
    detail = f"missing {missing}" + (f", unexpected {extra}" if extra else "")
    if missing and {m.lower() for m in missing} <= got:
        detail += " (same names in another letter case)"
    return f"resembles {best.kind} ({best.about}): {detail}"


@dataclass
class ParsedCsv:
    """A recognised CSV: its format, its normalised rows, and how it was read."""

    format: CsvFormat
    frame: pd.DataFrame
    table: CsvTable

    @property
    def kind(self) -> str:
        return self.format.kind


def read_metadata_file(path: Path) -> ParsedCsv | str:
    """Read and recognise one CSV; the parsed file, or why it was not recognised (a line of text)."""
    table = read_csv_table(path)
    if table is None or not table.header or not table.header[0]:
        return "empty or no header"
    fmt = identify_format(table.header)
    if fmt is None:
        return resembles(table.header) or ""
    return ParsedCsv(fmt, fmt.read(table), table)


def read_metadata_csv(path: Path) -> tuple[str, pd.DataFrame] | None:
    """Recognise a CSV by its header; return (kind, normalised frame) or None if unknown.

    Label rows are returned with ``malignant`` etc. possibly NaN; callers drop and count those.
    Metadata-only kinds (``isic2017_meta``, ``isic2019_meta``) hold age/sex/site to merge;
    ``duplicates2020`` holds pairs in ``keep`` and ``drop`` — see :func:`load_metadata`.
    """
    parsed = read_metadata_file(path)
    return (parsed.kind, parsed.frame) if isinstance(parsed, ParsedCsv) else None
