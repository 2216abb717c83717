"""The official ISIC / HAM10000 / Fitzpatrick17k metadata, read as published, cleaned into one table.

Files are recognised by their header (or, for the header-less 2016 files, by their first cell),
never by their name, so renamed copies work. Every kind is normalised to the same columns (see
``STANDARD_COLUMNS``). Rules, stated once:

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
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.images import check_file

STANDARD_COLUMNS = [
    C.COL_IMAGE_ID, C.COL_SOURCE, C.COL_YEAR, C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA, C.COL_KERATOSIS,
    C.COL_PATIENT, C.COL_LESION, C.COL_AGE, C.COL_SEX, C.COL_SITE, C.COL_FITZPATRICK, "base_id",
]
TASKS = {"malignant": C.COL_MALIGNANT, "melanoma": C.COL_MELANOMA, "keratosis": C.COL_KERATOSIS}
YEARS = {"isic2016": 2016, "isic2017": 2017, "isic2018": 2018, "ham10000": 2018, "isic2019": 2019,
         "isic2020": 2020, "fitzpatrick17k": 2021, "custom": 2100}
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
ISIC_ID = re.compile(r"^ISIC_\d+")
YEAR_IN_PATH = re.compile(r"[/\\](20\d\d)[/\\]")


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        first = handle.readline()
    return [c.strip() for c in first.strip().split(",")]


def _frame(**columns: Any) -> pd.DataFrame:
    n = max((len(v) for v in columns.values() if isinstance(v, (list, np.ndarray, pd.Series))), default=0)
    data = {}
    for name in STANDARD_COLUMNS:
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


def read_metadata_csv(path: Path) -> tuple[str, pd.DataFrame] | None:
    """Recognise a CSV by its header; return (kind, normalised frame) or None if unknown.

    Label rows are returned with ``malignant`` etc. possibly NaN; callers drop and count those.
    Metadata-only kinds (``isic2017_meta``, ``isic2019_meta``) hold age/sex/site to merge;
    ``duplicates2020`` holds pairs in ``image_id`` (kept) and ``base_id`` (dropped) — see
    :func:`load_metadata`; ``isic2019_test_meta`` has no labels.
    """
    path = Path(path)
    header = _header(path)
    if not header or not header[0]:
        return None
    cols = set(header)
    if ISIC_ID.match(header[0]) and len(header) == 2:
        raw = pd.read_csv(path, header=None, names=["image_id", "label"], dtype=str)
        label = raw["label"].str.strip().str.lower()
        if label.isin(["benign", "malignant"]).all():
            malignant = label.map({"benign": 0.0, "malignant": 1.0})
        else:
            malignant = pd.to_numeric(label, errors="coerce")
            malignant = malignant.where(malignant.isin([0.0, 1.0]))
        return "isic2016", _frame(image_id=raw["image_id"].str.strip(), source="isic2016", year=2016,
                                  diagnosis=np.where(malignant == 1, "MEL", "BEN"), malignant=malignant,
                                  melanoma=malignant)
    df = pd.read_csv(path, dtype=str)
    df.columns = [c.strip() for c in df.columns]
    if cols == {"image_id", "melanoma", "seborrheic_keratosis"}:
        mel = pd.to_numeric(df["melanoma"], errors="coerce")
        sk = pd.to_numeric(df["seborrheic_keratosis"], errors="coerce")
        diag = np.where(mel == 1, "MEL", np.where(sk == 1, "SK", "NV"))
        return "isic2017", _frame(image_id=df["image_id"], source="isic2017", year=2017, diagnosis=diag,
                                  malignant=mel, melanoma=mel, keratosis=sk)
    if cols == {"image_id", "age_approximate", "sex"}:
        return "isic2017_meta", _frame(image_id=df["image_id"], source="isic2017", year=2017,
                                       age=pd.to_numeric(df["age_approximate"], errors="coerce"), sex=df["sex"])
    if header == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]:
        diag = _onehot(df, header[1:])
        mal = diag.isin(MALIGNANT_2018).astype(float).where(diag.notna())
        return "isic2018", _frame(image_id=df["image"], source="isic2018", year=2018,
                                  diagnosis=diag.replace({"AKIEC": "AK"}), malignant=mal,
                                  melanoma=(diag == "MEL").astype(float).where(diag.notna()))
    if {"lesion_id", "image_id", "dx"} <= cols and "dx_type" in cols:
        diag = df["dx"].str.strip().str.lower().map(HAM_DX)
        mal = diag.isin(MALIGNANT_2019).astype(float).where(diag.notna())
        return "ham10000", _frame(image_id=df["image_id"], source="ham10000", year=2018, diagnosis=diag,
                                  malignant=mal, melanoma=(diag == "MEL").astype(float).where(diag.notna()),
                                  lesion_id=df["lesion_id"], age=pd.to_numeric(df.get("age"), errors="coerce"),
                                  sex=df.get("sex"), site=df.get("localization"))
    if header[:10] == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]:
        diag = _onehot(df, header[1:10])
        mal = diag.isin(MALIGNANT_2019).astype(float).where(diag.notna() & (diag != "UNK"))
        mel = (diag == "MEL").astype(float).where(diag.notna() & (diag != "UNK"))
        return "isic2019", _frame(image_id=df["image"], source="isic2019", year=2019, diagnosis=diag,
                                  malignant=mal, melanoma=mel)
    if cols == {"image", "age_approx", "anatom_site_general", "lesion_id", "sex"}:
        return "isic2019_meta", _frame(image_id=df["image"], source="isic2019", year=2019,
                                       age=pd.to_numeric(df["age_approx"], errors="coerce"), sex=df["sex"],
                                       site=df["anatom_site_general"], lesion_id=df["lesion_id"])
    if cols == {"image", "age_approx", "anatom_site_general", "sex"}:
        return "isic2019_test_meta", _frame(image_id=df["image"], source="isic2019", year=2019)
    if {"image_name", "patient_id", "target", "benign_malignant", "diagnosis"} <= cols:
        target = pd.to_numeric(df["target"], errors="coerce")
        target = target.where(target.isin([0.0, 1.0]))
        raw_diag = df["diagnosis"].fillna("unknown").str.strip().str.lower()
        diag = raw_diag.map(DIAGNOSIS_2020).fillna("UNK")
        keratosis = (diag == "SK").astype(float).where(diag != "UNK")
        kind = "isic2020_v2" if "lesion_id" in cols else "isic2020_v1"
        return kind, _frame(image_id=df["image_name"], source="isic2020", year=2020, diagnosis=diag,
                            malignant=target, melanoma=target, keratosis=keratosis, patient_id=df["patient_id"],
                            lesion_id=df.get("lesion_id"), age=pd.to_numeric(df["age_approx"], errors="coerce"),
                            sex=df["sex"], site=df["anatom_site_general_challenge"])
    if header == ["image_name_1", "image_name_2"]:
        return "duplicates2020", pd.DataFrame({"keep": df["image_name_1"], "drop": df["image_name_2"]})
    if {"md5hash", "fitzpatrick_scale", "three_partition_label", "label"} <= cols:
        three = df["three_partition_label"].str.strip().str.lower()
        mal = (three == "malignant").astype(float).where(three.notna() & (three != ""))
        label = df["label"].fillna("").str.strip().str.lower()
        fitz = pd.to_numeric(df["fitzpatrick_scale"], errors="coerce")
        fitz = fitz.where(fitz.between(1, 6), -1).fillna(-1).astype(int)
        return "fitzpatrick17k", _frame(image_id=df["md5hash"], source="fitzpatrick17k", year=2021,
                                        diagnosis=label, malignant=mal,
                                        melanoma=label.str.contains("melanoma").astype(float),
                                        keratosis=(label == "seborrheic keratosis").astype(float),
                                        fitzpatrick=fitz)
    if len(header) == 2 and header[0] in ("image_id", "image") and header[1] in ("label", "target"):
        label = df[header[1]].fillna("").str.strip().str.lower()
        mal = label.map({"benign": 0.0, "malignant": 1.0, "0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0})
        return "custom", _frame(image_id=df[header[0]], source="custom", year=YEARS["custom"],
                                diagnosis=np.where(mal == 1, "MALIGNANT", "BENIGN"), malignant=mal)
    return None


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
    report: dict[str, Any] = {"files": {}, "unrecognised_files": [], "dropped": {}, "conflicts": []}
    labels, metas, dup_pairs = [], [], []
    kmel_outputs = {C.METADATA_CSV, C.SKIPPED_CSV, "synthetic_truth.csv", "truth.csv", "predictions.csv"}
    for path in _walk_files(data_dir, lambda n: n.lower().endswith(".csv")):
        if path.name in kmel_outputs:
            continue
        problem = check_file(path, max_bytes=1 << 62)  # a FIFO named x.csv would block the reader
        if problem:
            report["unrecognised_files"].append(f"{path}: {problem}")
            continue
        try:
            parsed = read_metadata_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            report["unrecognised_files"].append(f"{path}: cannot parse ({exc})")
            continue
        if parsed is None:
            report["unrecognised_files"].append(str(path))
            continue
        kind, frame = parsed
        report["files"][str(path.relative_to(data_dir))] = {"kind": kind, "rows": int(len(frame))}
        if kind == "duplicates2020":
            dup_pairs.append(frame)
        elif kind.endswith("_meta"):
            if kind != "isic2019_test_meta":
                metas.append(frame)
        else:
            labels.append(frame)
    if not labels:
        return pd.DataFrame(columns=STANDARD_COLUMNS), report
    table = pd.concat(labels, ignore_index=True)
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


def split_table(table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Add ``split``: no patient (or HAM10000 lesion) in two splits; strata of (target, skin tone).

    Groups are a patient id, else a lesion id, else the image itself. Groups are ordered by
    stratum and a seeded random key, and the k-th group goes to test / val / train by a golden-ratio
    sequence, which keeps every stratum (even a tiny one) and the whole table close to the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
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

