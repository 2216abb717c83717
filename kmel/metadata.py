"""The official ISIC / HAM10000 / Fitzpatrick17k / ISIC Archive / DDI metadata, read as published,
cleaned into one table.

Files are recognised by their header (or, for the header-less 2016 files, by their first cell),
never by their name, so renamed copies work: each format is one reader registered with
:func:`register_format` and the header that identifies it (``FORMATS``, tried in order). Every kind is
normalised to the same columns (see ``STANDARD_COLUMNS``). Reading is lenient (:func:`read_csv_table`):
UTF-8 else Windows-1252, ``,`` / ``;`` / tab sniffed, lines that do not fit the header skipped and listed.
kmel's own tables are recognised by their columns or their folder and never read as data. Rules, stated once:

* Diagnosis codes are upper case: MEL, NV, BCC, AK (2018's AKIEC becomes AK), SCC, BKL, DF, VASC,
  SK, UNK; 2016 benign rows, whose subtype is not published, are ``BEN``; Fitzpatrick17k keeps its
  condition name.
* ``malignant``: 2016 malignant, 2017 melanoma, 2018/HAM MEL|BCC|AKIEC, 2019 MEL|BCC|AK|SCC, 2020
  target, Fitzpatrick17k ``three_partition_label == malignant``, custom label.
* ``keratosis`` (seborrheic keratosis vs rest) is known for 2017 and for 2020 rows with a stated
  diagnosis. BKL (2018/HAM/2019) lumps seborrheic keratoses with solar lentigines and
  lichen-planus-like keratoses, so it is *unknown* there, not 1.
* HAM10000 and the ISIC 2018 Task 3 training set are the same images: one row, source
  ``ham10000`` (it carries the lesion id).
* Duplicate lists drop the listed year's copy (path component ``/20xx/``) or every copy when
  the path names no year. ISIC 2020 duplicate pairs drop ``image_name_2``. An image id (minus
  ``_downsampled``) seen in several sources keeps the newest source's row.
* Conflicting labels for one image across sources are reported and resolved as *malignant if
  any source says malignant*: a histology-confirmed malignancy in one archive should not be
  overwritten by another archive's benign label.
* ISIC Archive exports: ``diagnosis_1`` (or the older ``benign_malignant``) gives the label;
  Indeterminate rows and non-dermoscopic ``image_type`` rows are dropped and counted. The archive is
  the newest source, so its row wins over a challenge copy of the same image. Duplicate lists name
  challenge years, so they match archive rows only through year-less entries.
* DDI (clinical photographs) is evaluation-only: :func:`split_table` puts it in ``test``.
* ``fitzpatrick_group``: the annotated type as I-II / III-IV / V-VI (DDI publishes only these bands).
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.images import check_file

# Fitzpatrick type as I-II / III-IV / V-VI: the only resolution DDI publishes, filled for every annotated source.
COL_FITZPATRICK_GROUP = "fitzpatrick_group"
# Why a reader rejects a row it read (indeterminate, not dermoscopic); dropped and counted by load_metadata.
COL_DROP_REASON = "drop_reason"
STANDARD_COLUMNS = [
    C.COL_IMAGE_ID, C.COL_SOURCE, C.COL_YEAR, C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA, C.COL_KERATOSIS,
    C.COL_PATIENT, C.COL_LESION, C.COL_AGE, C.COL_SEX, C.COL_SITE, C.COL_FITZPATRICK, COL_FITZPATRICK_GROUP, "base_id",
]
TASKS = {"malignant": C.COL_MALIGNANT, "melanoma": C.COL_MELANOMA, "keratosis": C.COL_KERATOSIS}
YEARS = {"isic2016": 2016, "isic2017": 2017, "isic2018": 2018, "ham10000": 2018, "isic2019": 2019,
         "isic2020": 2020, "fitzpatrick17k": 2021, "ddi": 2021, "isic_archive": 2024, "custom": 2100}
# Tie-break among sources of one year: the more specific one wins (HAM10000 carries lesion ids).
SOURCE_PRIORITY = {"ham10000": 0, "isic2018": 1}
MALIGNANT_2018 = {"MEL", "BCC", "AKIEC", "AK"}
MALIGNANT_2019 = {"MEL", "BCC", "AK", "SCC"}
DIAGNOSIS_2020 = {
    "melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "SK", "lentigo nos": "BKL", "solar lentigo": "BKL",
    "lichenoid keratosis": "BKL", "cafe-au-lait macule": "CALM", "atypical melanocytic proliferation": "AMP",
    "unknown": "UNK",
}
HAM_DX = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC"}
# ISIC Archive diagnosis names (old ``diagnosis`` and the ``diagnosis_2..5`` hierarchy) to codes; the
# first fragment found in the most specific name wins.
ARCHIVE_DX = (
    ("melanoma", "MEL"), ("basal cell", "BCC"), ("squamous cell", "SCC"), ("actinic", "AK"), ("solar keratosis", "AK"),
    ("seborrheic", "SK"), ("nevus", "NV"), ("nevi", "NV"), ("dermatofibroma", "DF"), ("lentigo", "BKL"),
    ("lichen", "BKL"), ("angioma", "VASC"), ("vascular", "VASC"), ("pyogenic", "VASC"),
)
FITZPATRICK_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
# Fitzpatrick types in the three bands DDI publishes (12 / 34 / 56), for every annotated source.
FITZPATRICK_GROUPS = ("I-II", "III-IV", "V-VI")
DDI_SKIN_TONE = {"12": "I-II", "34": "III-IV", "56": "V-VI"}
# Sources used only for evaluation unless asked otherwise (clinical photographs, not dermoscopy).
EVAL_ONLY_SOURCES = ("ddi",)
ISIC_ID = re.compile(r"^ISIC_\d+")
YEAR_IN_PATH = re.compile(r"[/\\](20\d\d)[/\\]")
# Folders kmel writes (records, saved models) hold one of these, with a "kmel_version" in it.
KMEL_OUTPUT_MARKERS = (C.MANIFEST, "pipeline.json")

def _frame(**columns: Any) -> pd.DataFrame:
    n = max((len(v) for v in columns.values() if isinstance(v, (list, np.ndarray, pd.Series))), default=0)
    data = {}
    names = STANDARD_COLUMNS + ([COL_DROP_REASON] if COL_DROP_REASON in columns else [])
    for name in names:
        value = columns.get(name, np.nan)
        data[name] = list(value) if isinstance(value, (list, np.ndarray, pd.Series)) else [value] * n
    df = pd.DataFrame(data)
    df["base_id"] = df[C.COL_IMAGE_ID].astype(str).str.replace("_downsampled", "", regex=False)
    return df


def _onehot(df: pd.DataFrame, classes: list[str]) -> pd.Series:
    values = df[classes].apply(pd.to_numeric, errors="coerce")
    diag = values.idxmax(axis=1)
    diag[values.max(axis=1).fillna(0) <= 0] = np.nan
    return diag


# === Reading a CSV: encoding, delimiter, bad lines ===


@dataclass
class CsvTable:
    """A delimited text file read leniently: its header, its well-formed rows, and what was lost."""

    path: Path
    header: list[str]
    rows: pd.DataFrame  # data rows as text (NaN where empty), columns = header
    encoding: str = "utf-8"
    delimiter: str = ","
    bad_lines: list[dict[str, Any]] = field(default_factory=list)

    def with_header_as_row(self, names: Sequence[str]) -> pd.DataFrame:
        """Header-less files: the first line is data too; columns renamed to ``names``."""
        first = pd.DataFrame([self.header], columns=self.rows.columns)
        out = pd.concat([first, self.rows], ignore_index=True)
        out.columns = list(names)
        return out


def _decode(data: bytes) -> tuple[str, str]:
    """Text and the encoding that read it: UTF-8, else Windows-1252 (spreadsheet exports), else Latin-1."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding), "utf-8" if encoding == "utf-8-sig" else encoding
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _split(line: str, delimiter: str) -> list[str] | None:
    """Fields of one record, or None when a quote is left open."""
    if '"' not in line:
        return line.split(delimiter)
    if line.count('"') % 2:
        return None
    return next(csv.reader([line], delimiter=delimiter))


def read_csv_table(path: Path) -> CsvTable | None:
    """Read ``path`` line by line; lines that do not fit the header are listed, not fatal.

    A record may span several lines inside quotes; a quote left open, or a line with more or fewer
    fields than the header, is skipped and listed with its line number. Returns None for an empty file.
    """
    path = Path(path)
    text, encoding = _decode(path.read_bytes())
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None:
        return None
    delimiter = _sniff_delimiter(lines[start])
    header = _split(lines[start], delimiter)
    if header is None:
        return None
    header = [h.strip() for h in header]
    width = len(header)
    good, bad = [], []
    i = start + 1
    while i < len(lines):
        line, number = lines[i], i + 1
        i += 1
        if not line.strip() or not line.strip(delimiter + " "):
            continue
        fields = _split(line, delimiter)
        joined = 0
        while fields is None and joined < 5 and i + joined < len(lines):
            joined += 1  # a quoted field with line breaks
            fields = _split("\n".join(lines[i - 1: i + joined]), delimiter)
        if fields is None:
            bad.append({"line": number, "reason": "quote not closed"})
            continue
        if len(fields) != width:
            bad.append({"line": number, "reason": f"{len(fields)} fields, header has {width}"})
            continue
        i += joined
        good.append(fields)
    rows = pd.DataFrame(good, columns=[f"_{k}" for k in range(width)], dtype=object) if good else \
        pd.DataFrame(columns=[f"_{k}" for k in range(width)], dtype=object)
    # pandas' own missing-value rules, so every format reads as it did through pd.read_csv.
    rows = rows.mask(rows.isin(_NA_VALUES))
    rows.columns = header
    return CsvTable(path, header, rows, encoding, delimiter, bad)


# pandas' default missing-value strings (read_csv's na_values).
_NA_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
              "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]

# === Formats: one reader per kind, registered with the header that identifies it ===


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


@register_format("ham10000", ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"),
                 lambda h: {"lesion_id", "image_id", "dx", "dx_type"} <= set(h), about="HAM10000 metadata")
def _read_ham(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    diag = df["dx"].str.strip().str.lower().map(HAM_DX)
    mal = diag.isin(MALIGNANT_2019).astype(float).where(diag.notna())
    return _frame(image_id=df["image_id"], source="ham10000", year=2018, diagnosis=diag, malignant=mal,
                  melanoma=(diag == "MEL").astype(float).where(diag.notna()), lesion_id=df["lesion_id"],
                  age=pd.to_numeric(df.get("age"), errors="coerce"), sex=df.get("sex"), site=df.get("localization"))


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


@register_format("fitzpatrick17k", ("md5hash", "fitzpatrick_scale", "three_partition_label", "label"), "subset",
                 about="Fitzpatrick17k")
def _read_fitzpatrick17k(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    three = df["three_partition_label"].str.strip().str.lower()
    mal = (three == "malignant").astype(float).where(three.notna() & (three != ""))
    label = df["label"].fillna("").str.strip().str.lower()
    fitz = pd.to_numeric(df["fitzpatrick_scale"], errors="coerce")
    fitz = fitz.where(fitz.between(1, 6), -1).fillna(-1).astype(int)
    return _frame(image_id=df["md5hash"], source="fitzpatrick17k", year=2021, diagnosis=label, malignant=mal,
                  melanoma=label.str.contains("melanoma").astype(float),
                  keratosis=(label == "seborrheic keratosis").astype(float), fitzpatrick=fitz)


def _archive_code(name: pd.Series) -> pd.Series:
    lower = name.fillna("").str.lower()
    code = pd.Series("UNK", index=name.index, dtype=object)
    for fragment, value in reversed(ARCHIVE_DX):  # earlier fragments win
        code[lower.str.contains(fragment, regex=False)] = value
    return code


@register_format("isic_archive", ("isic_id", "diagnosis_1", "benign_malignant", "image_type", "patient_id", "lesion_id",
                                  "age_approx", "sex", "anatom_site_general", "fitzpatrick_skin_type"),
                 lambda h: "isic_id" in h and bool({"diagnosis_1", "benign_malignant"} & set(h)),
                 about="ISIC Archive export (isic-cli metadata.csv)")
def _read_isic_archive(t: CsvTable) -> pd.DataFrame:
    """ISIC Archive export: ``diagnosis_1`` (Benign/Malignant/Indeterminate) or older ``benign_malignant``."""
    df = t.rows
    empty = pd.Series(np.nan, index=df.index, dtype=object)
    if "diagnosis_1" in df:
        verdict = df["diagnosis_1"].str.strip().str.lower()
        older = df.get("benign_malignant", empty).str.strip().str.lower()
        verdict = verdict.where(verdict.notna(), older)
    else:
        verdict = df["benign_malignant"].str.strip().str.lower()
    malignant = verdict.map({"benign": 0.0, "malignant": 1.0})
    # The most specific diagnosis named: diagnosis_5 .. diagnosis_2, else the older diagnosis column.
    name = empty.copy()
    for col in ("diagnosis_5", "diagnosis_4", "diagnosis_3", "diagnosis_2", "diagnosis"):
        if col in df:
            name = name.where(name.notna(), df[col])
    diag = _archive_code(name)
    known = diag != "UNK"
    melanoma = (diag == "MEL").astype(float).where(known | (malignant == 0))
    image_type = df.get("image_type", empty).str.strip().str.lower()
    reason = pd.Series(np.nan, index=df.index, dtype=object)
    reason[verdict.fillna("").str.startswith("indeterminate")] = "indeterminate diagnosis (ISIC archive)"
    reason[image_type.notna() & (image_type != "dermoscopic")] = "not dermoscopic (ISIC archive image_type)"
    fitz = df.get("fitzpatrick_skin_type", empty).str.strip().str.upper()
    fitz = fitz.map(FITZPATRICK_ROMAN).fillna(pd.to_numeric(fitz, errors="coerce"))
    fitz = fitz.where(fitz.between(1, 6), -1).fillna(-1).astype(int)
    return _frame(image_id=df["isic_id"], source="isic_archive", year=YEARS["isic_archive"],
                  diagnosis=diag, malignant=malignant,
                  melanoma=melanoma.where(malignant.notna()),
                  keratosis=(diag == "SK").astype(float).where(known), patient_id=df.get("patient_id"),
                  lesion_id=df.get("lesion_id"), age=pd.to_numeric(df.get("age_approx"), errors="coerce"),
                  sex=df.get("sex"), site=df.get("anatom_site_general"), fitzpatrick=fitz, drop_reason=reason)


@register_format("ddi", ("DDI_file", "skin_tone", "malignant", "disease"), "subset",
                 about="Diverse Dermatology Images (Stanford), clinical photographs")
def _read_ddi(t: CsvTable) -> pd.DataFrame:
    df = t.rows
    malignant = df["malignant"].str.strip().str.lower().map({"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0})
    disease = df["disease"].fillna("").str.strip().str.lower()
    stem = df["DDI_file"].str.strip().str.rsplit(".", n=1).str[0]
    return _frame(image_id=stem, source="ddi", year=YEARS["ddi"], diagnosis=disease, malignant=malignant,
                  melanoma=disease.str.contains("melanoma").astype(float).where(malignant.notna()),
                  fitzpatrick_group=df["skin_tone"].str.strip().map(DDI_SKIN_TONE))


def _is_custom(header: list[str]) -> bool:
    return len(header) == 2 and header[0] in ("image_id", "image") and header[1] in ("label", "target")


@register_format("custom", ("image_id", "label"), _is_custom, about="your own image_id,label (or image,target) table")
def _read_custom(t: CsvTable) -> pd.DataFrame:
    df, (key, value) = t.rows, t.header
    label = df[value].fillna("").str.strip().str.lower()
    mal = label.map({"benign": 0.0, "malignant": 1.0, "0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0})
    return _frame(image_id=df[key], source="custom", year=YEARS["custom"],
                  diagnosis=np.where(mal == 1, "MALIGNANT", "BENIGN"), malignant=mal)


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


def _in_kmel_output_folder(path: Path, seen: dict[Path, bool]) -> bool:
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


def _how_read(table: CsvTable) -> dict[str, Any]:
    """The manifest's note on how a file was read, when it was not plain UTF-8 and commas."""
    out: dict[str, Any] = {}
    if table.encoding != "utf-8":
        out["encoding"] = f"{table.encoding} (not valid UTF-8)"
    if table.delimiter != ",":
        out["delimiter"] = {"\t": "tab"}.get(table.delimiter, table.delimiter)
    if table.bad_lines:
        out["bad_lines"] = table.bad_lines
    return out


def _rows_lost(table: CsvTable, frame: pd.DataFrame) -> dict[str, int]:
    """Rows of one label file that will not reach the table, by reason (before duplicates are resolved)."""
    lost: dict[str, int] = {}
    if table.bad_lines:
        lost["unreadable line"] = len(table.bad_lines)
    reasons = frame[COL_DROP_REASON] if COL_DROP_REASON in frame else pd.Series(np.nan, index=frame.index)
    for reason, n in reasons.value_counts().items():
        lost[str(reason)] = int(n)
    unlabelled = int((frame[C.COL_MALIGNANT].isna() & reasons.isna()).sum())
    if unlabelled:
        lost["no usable label (empty, NaN or unknown value)"] = unlabelled
    return lost


def read_duplicate_list(path: Path) -> list[tuple[int | None, str]]:
    """(year named in the path or None, file stem) for each line of a duplicate list."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        match = YEAR_IN_PATH.search(line)
        stem = re.split(r"[/\\]", line)[-1].rsplit(".", 1)[0]
        out.append((int(match.group(1)) if match else None, stem))
    return out


def _walk_files(root: Path, predicate) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if predicate(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def load_metadata(
    data_dir: Path, extra_duplicate_lists: Sequence[Path] = (), sources: Sequence[str] = ()
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read every known CSV and duplicate list under ``data_dir``; one clean table and a report."""
    data_dir = Path(data_dir)
    report: dict[str, Any] = {"files": {}, "unrecognised_files": [], "kmel_outputs": [], "dropped": {},
                              "conflicts": []}
    labels, metas, dup_pairs = [], [], []
    output_folders: dict[Path, bool] = {}
    for path in _walk_files(data_dir, lambda n: n.lower().endswith(".csv")):
        # kmel's own outputs are known by where they are (a records / models folder) or by their
        # columns (below), never by their name: isic-cli also writes metadata.csv.
        if _in_kmel_output_folder(path, output_folders):
            report["kmel_outputs"].append(str(path))
            continue
        problem = check_file(path, max_bytes=1 << 62)  # a FIFO named x.csv would block the reader
        if problem:
            report["unrecognised_files"].append(f"{path}: {problem}")
            continue
        try:
            parsed = read_metadata_file(path)
        except (OSError, ValueError, csv.Error) as exc:
            report["unrecognised_files"].append(f"{path}: cannot parse ({exc})")
            continue
        if isinstance(parsed, str):
            report["unrecognised_files"].append(f"{path}: {parsed}" if parsed else str(path))
            continue
        role, frame = parsed.format.role, parsed.frame
        if role == "kmel_output":
            report["kmel_outputs"].append(str(path))
            continue
        entry = report["files"][str(path.relative_to(data_dir))] = {"kind": parsed.kind, "rows": int(len(frame))}
        entry.update(_how_read(parsed.table))
        if role == "duplicates":
            dup_pairs.append(frame)
        elif role == "meta":
            metas.append(frame)
        elif role == "labels":
            lost = _rows_lost(parsed.table, frame)
            if lost:
                entry["rows_lost"] = lost
            labels.append(frame)
    if not labels:
        return pd.DataFrame(columns=STANDARD_COLUMNS), report
    table = pd.concat(labels, ignore_index=True)
    if COL_DROP_REASON not in table:
        table[COL_DROP_REASON] = np.nan
    for col in (C.COL_MALIGNANT, C.COL_MELANOMA, C.COL_KERATOSIS):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    table[C.COL_IMAGE_ID] = table[C.COL_IMAGE_ID].astype(str).str.strip()
    if sources:
        unknown = set(sources) - set(YEARS)
        if unknown:
            from kmel.config import ConfigError

            raise ConfigError(f"unknown source(s) {sorted(unknown)}; known: {sorted(YEARS)}")
        table = table[table[C.COL_SOURCE].isin(sources)]

    def drop(mask: pd.Series, reason: str) -> None:
        nonlocal table
        n = int(mask.sum())
        if n:
            report["dropped"][reason] = report["dropped"].get(reason, 0) + n
            table = table[~mask].reset_index(drop=True)

    for reason in sorted(table[COL_DROP_REASON].dropna().unique()):
        drop(table[COL_DROP_REASON] == reason, reason)
    table = table.drop(columns=COL_DROP_REASON)
    drop(table[C.COL_MALIGNANT].isna(), "no usable label (empty, NaN or unknown value)")
    # Conflicting labels for one image (between sources, or twice in one file), found before any
    # copy is dropped, so a label that disagrees with the kept copy's still counts.
    multi = table[table.duplicated("base_id", keep=False)]
    if len(multi):
        spread = multi.groupby("base_id")[C.COL_MALIGNANT].agg(["min", "max"])
        conflicting = spread[spread["min"] != spread["max"]].index
        for base in conflicting:
            rows = multi[multi["base_id"] == base]
            report["conflicts"].append({
                "image_id": base,
                "labels": [{"source": s, "image_id": i, "malignant": float(m)} for s, i, m in
                           zip(rows[C.COL_SOURCE], rows[C.COL_IMAGE_ID], rows[C.COL_MALIGNANT])],
                "resolved": "malignant (any copy says malignant)",
            })
        worst = table.groupby("base_id")[C.COL_MALIGNANT].transform("max")
        worst_mel = table.groupby("base_id")[C.COL_MELANOMA].transform("max")
        table[C.COL_MALIGNANT] = worst
        table[C.COL_MELANOMA] = worst_mel.where(table[C.COL_MELANOMA].notna() | worst_mel.notna())
    # Same image listed twice in one source (e.g. 2020 v1 and v2 both present): keep the first, the
    # v2 file sorts after v1 so prefer rows with a lesion id.
    table = table.sort_values([C.COL_SOURCE, C.COL_IMAGE_ID, C.COL_LESION], na_position="first", kind="stable")
    drop(table.duplicated([C.COL_SOURCE, C.COL_IMAGE_ID], keep="last"), "listed twice in one source (e.g. 2020 v1 and v2 both present)")

    # Metadata-only files fill age / sex / site / lesion id of their source's rows. Text columns
    # that are all-NaN so far (only one source present) must become object before taking strings.
    for col in (C.COL_SEX, C.COL_SITE, C.COL_LESION, C.COL_PATIENT):
        table[col] = table[col].astype(object)
    for meta in metas:
        meta = meta.drop_duplicates(C.COL_IMAGE_ID).set_index(C.COL_IMAGE_ID)
        rows = table[C.COL_SOURCE] == meta[C.COL_SOURCE].iloc[0]
        for col in (C.COL_AGE, C.COL_SEX, C.COL_SITE, C.COL_LESION):
            values = table.loc[rows, C.COL_IMAGE_ID].map(meta[col])
            table.loc[rows, col] = table.loc[rows, col].where(table.loc[rows, col].notna(), values)

    # Duplicate lists.
    lists = _walk_files(data_dir, lambda n: n.lower().endswith(".txt") and "duplicate" in n.lower())
    listed: set[tuple[int | None, str]] = set()
    for path in [*lists, *map(Path, extra_duplicate_lists)]:
        problem = check_file(path, max_bytes=1 << 62)
        if problem:
            report["unrecognised_files"].append(f"{path}: {problem}")
            continue
        entries = read_duplicate_list(path)
        listed.update(entries)
        report["files"][str(path)] = {"kind": "duplicate_list", "rows": len(entries)}
    if listed:
        by_year = {(y, s) for y, s in listed if y is not None}
        any_year = {s for y, s in listed if y is None}
        keys = list(zip(table[C.COL_YEAR].astype(int), table[C.COL_IMAGE_ID]))
        hit = pd.Series([k in by_year or k[1] in any_year for k in keys], index=table.index)
        drop(hit, "named in a duplicate list")
    if dup_pairs:
        # One copy of each pair is kept: image_name_2 goes only while image_name_1 is still here
        # (a duplicate list may already have removed image_name_1; dropping both would lose the image).
        pairs = pd.concat(dup_pairs, ignore_index=True)
        present = set(table.loc[table[C.COL_SOURCE] == "isic2020", C.COL_IMAGE_ID])
        doomed = {d for k, d in zip(pairs["keep"], pairs["drop"]) if k in present and d in present}
        drop((table[C.COL_SOURCE] == "isic2020") & table[C.COL_IMAGE_ID].isin(doomed),
             "ISIC 2020 duplicate pair (one copy dropped)")

    table["_priority"] = table[C.COL_SOURCE].map(SOURCE_PRIORITY).fillna(5)
    table = table.sort_values([C.COL_YEAR, "_priority"], ascending=[False, True], kind="stable")
    drop(table.duplicated("base_id", keep="first"), "same image in several sources (newest kept)")
    table = table.drop(columns="_priority").sort_values(C.COL_IMAGE_ID, kind="stable").reset_index(drop=True)
    table[C.COL_FITZPATRICK] = pd.to_numeric(table[C.COL_FITZPATRICK], errors="coerce").fillna(-1).astype(int)
    banded = table[C.COL_FITZPATRICK].map({1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"})
    table[COL_FITZPATRICK_GROUP] = table[COL_FITZPATRICK_GROUP].where(table[COL_FITZPATRICK_GROUP].notna(), banded)
    table[C.COL_YEAR] = table[C.COL_YEAR].astype(int)
    report["rows_per_source"] = {k: int(v) for k, v in table[C.COL_SOURCE].value_counts().sort_index().items()}
    report["malignant_per_source"] = {
        k: int(v) for k, v in table.groupby(C.COL_SOURCE)[C.COL_MALIGNANT].sum().sort_index().items()
    }
    return table, report


def find_images(data_dir: Path) -> dict[str, Path]:
    """Image id (file stem) → path, for images anywhere under ``data_dir`` (not under masks/).

    Formats kmel does not decode (HEIC, JPEG 2000, ...) are found too, last in preference, so a
    labelled image in such a format is listed in skipped.csv with its format instead of counted missing.
    """
    preference = {ext: i for i, ext in enumerate((*C.IMAGE_EXTENSIONS, *C.UNSUPPORTED_IMAGE_EXTENSIONS))}
    found: dict[str, Path] = {}
    for dirpath, dirs, files in os.walk(data_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d.lower() != "masks")
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            ext = "." + ext.lower()
            if not dot or ext not in preference or stem.lower().endswith("_segmentation"):
                continue
            current = found.get(stem)
            if current is None or preference[ext] < preference[current.suffix.lower()]:
                found[stem] = Path(dirpath) / name
    return found


def find_masks(data_dir: Path) -> dict[str, Path]:
    """Image id → mask path for ``<id>_segmentation.png``, ``<id>_Segmentation.png`` or ``<id>.png`` under any masks/."""
    found: dict[str, Path] = {}
    for dirpath, dirs, files in os.walk(data_dir, followlinks=True):
        dirs.sort()
        if "masks" not in [p.lower() for p in Path(dirpath).relative_to(data_dir).parts]:
            continue
        for name in sorted(files):
            if not name.lower().endswith(".png"):
                continue
            stem = name[:-4]
            if stem.lower().endswith("_segmentation"):
                stem = stem[: -len("_segmentation")]
            found.setdefault(stem, Path(dirpath) / name)
    return found


def drop_content_duplicates(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Rows whose image files are byte-identical (same ``sha256``): keep the newest source's row."""
    if C.COL_SHA256 not in table or table.empty:
        return table, []
    ordered = table.assign(_p=table[C.COL_SOURCE].map(SOURCE_PRIORITY).fillna(5)).sort_values(
        [C.COL_YEAR, "_p", C.COL_IMAGE_ID], ascending=[False, True, True], kind="stable")
    kept = ordered.drop_duplicates(C.COL_SHA256, keep="first")
    first = kept.set_index(C.COL_SHA256)[C.COL_IMAGE_ID]
    dropped_rows = ordered[ordered.duplicated(C.COL_SHA256, keep="first")]
    dropped = [{"dropped": i, "kept": first[h]} for i, h in zip(dropped_rows[C.COL_IMAGE_ID], dropped_rows[C.COL_SHA256])]
    out = kept.drop(columns="_p").sort_values(C.COL_IMAGE_ID, kind="stable").reset_index(drop=True)
    return out, dropped


def apply_task(table: pd.DataFrame, task: str) -> pd.DataFrame:
    """Add ``target`` for ``task`` (malignant | melanoma | keratosis); rows unknown for it are dropped."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(TASKS)}")
    column = TASKS[task]
    out = table[table[column].notna()].copy()
    out[C.COL_TARGET] = out[column].astype(int)
    return out.reset_index(drop=True)


def split_table(
    table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
    eval_only_sources: Sequence[str] = EVAL_ONLY_SOURCES,
) -> pd.DataFrame:
    """Add ``split``: no patient (or HAM10000 lesion) in two splits; strata of (target, skin tone).

    Rows of ``eval_only_sources`` (DDI's clinical photographs by default) all go to ``test`` and never
    to train or val; pass ``()`` to split them like the rest.

    Groups are a patient id, else a lesion id, else the image itself. Groups are ordered by
    stratum and a seeded random key, and the k-th group goes to test / val / train by a golden-ratio
    sequence, which keeps every stratum (even a tiny one) and the whole table close to the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    held_out = table[C.COL_SOURCE].isin(list(eval_only_sources)) if C.COL_SOURCE in table else None
    if held_out is not None and held_out.any():
        rest = split_table(table[~held_out], val_fraction, test_fraction, seed, eval_only_sources=())
        return pd.concat([rest, table[held_out].assign(**{C.COL_SPLIT: "test"})]).loc[table.index]
    out = table.copy()
    patient = out[C.COL_PATIENT].fillna("").astype(str) if C.COL_PATIENT in out else pd.Series("", index=out.index)
    lesion = out[C.COL_LESION].fillna("").astype(str) if C.COL_LESION in out else pd.Series("", index=out.index)
    group = np.where(patient != "", "P:" + patient, np.where(lesion != "", "L:" + lesion, "I:" + out[C.COL_IMAGE_ID]))
    out["_group"] = group
    tone = out[C.COL_SKIN_TONE] if C.COL_SKIN_TONE in out else pd.Series(0, index=out.index)
    groups = out.assign(_tone=tone).groupby("_group").agg(target=(C.COL_TARGET, "max"), tone=("_tone", "first"))
    rng = np.random.default_rng(seed)
    groups["_key"] = rng.permutation(len(groups))
    groups = groups.sort_values(["target", "tone", "_key"], kind="stable")
    phi = (math.sqrt(5) - 1) / 2
    offset = rng.uniform()
    u = (offset + phi * np.arange(len(groups))) % 1.0
    groups["split"] = np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))
    out[C.COL_SPLIT] = out["_group"].map(groups["split"])
    return out.drop(columns="_group")

