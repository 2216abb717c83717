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
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.data.diagnosis import diagnosis_classes
from kmel.data.formats.csvread import CsvTable
from kmel.data.formats.kmel_outputs import in_kmel_output_folder
from kmel.data.formats.registry import (
    COL_DROP_REASON,
    COL_FITZPATRICK_GROUP,
    STANDARD_COLUMNS,
    YEARS,
    read_metadata_file,
)
from kmel.data.hdf5 import (
    close_containers,
    is_container,
    list_members,
    member_name,
    read_source,
    source_size,
)
from kmel.data.images import ImageReadError, check_file

TASKS = {"malignant": C.COL_MALIGNANT, "melanoma": C.COL_MELANOMA, "keratosis": C.COL_KERATOSIS}
# Tie-break among sources of one year: the more specific one wins (HAM10000 carries lesion ids).
SOURCE_PRIORITY = {"ham10000": 0, "isic2018": 1}
# Fitzpatrick types in the three bands DDI publishes (12 / 34 / 56), for every annotated source.
FITZPATRICK_GROUPS = ("I-II", "III-IV", "V-VI")
# Sources used only for evaluation unless asked otherwise (clinical photographs, not dermoscopy).
YEAR_IN_PATH = re.compile(r"[/\\](20\d\d)[/\\]")


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
        if in_kmel_output_folder(path, output_folders):
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


def _same_content(a: Path, b: Path) -> bool:
    size_a, size_b = source_size(a), source_size(b)
    if size_a is not None and size_b is not None and size_a != size_b:
        return False  # e.g. Kaggle's ISIC 2024 download: 401,059 JPEGs and the same crops in train-image.hdf5
    try:
        return read_source(a, 1 << 62) == read_source(b, 1 << 62)
    except (OSError, ImageReadError):
        return False


def find_images(data_dir: Path, twins: list[dict[str, str]] | None = None,
                unreadable: list[str] | None = None) -> dict[str, Path]:
    """Image id (file stem) → path, for images anywhere under ``data_dir`` (not under masks/).

    Images inside HDF5 files (ISIC 2024's ``train-image.hdf5``: one dataset per image id) are found by their
    dataset names and named ``<file.hdf5>/<id>`` (:mod:`kmel.data.hdf5`), after image files in preference; a file
    that is not readable HDF5 is appended to ``unreadable`` with the reason. Formats kmel does not decode (HEIC,
    JPEG 2000, ...) are found too, last in preference, so a labelled image in such a format is listed in
    skipped.csv with its format instead of counted missing. Two files of one id with different content
    (``ISIC_1.jpg`` and ``ISIC_1.JPG``, or one in two folders) are appended to ``twins`` (``image_id``,
    ``used``, ``other``): one is used, and the user should know.
    """
    order = (*C.IMAGE_EXTENSIONS, "hdf5", *C.UNSUPPORTED_IMAGE_EXTENSIONS)
    preference = {ext: i for i, ext in enumerate(order)}
    found: dict[str, Path] = {}
    ranks: dict[str, int] = {}
    for dirpath, dirs, files in os.walk(data_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d.lower() != "masks")
        entries: list[tuple[str, Path, int]] = []
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            ext = "." + ext.lower()
            if dot and is_container(name):
                try:
                    keys = list_members(Path(dirpath) / name)
                except ImageReadError as exc:
                    if unreadable is not None:
                        unreadable.append(str(exc))
                    continue
                entries += [(key, Path(member_name(Path(dirpath) / name, key)), preference["hdf5"]) for key in keys]
            elif dot and ext in preference and not stem.lower().endswith("_segmentation"):
                entries.append((stem, Path(dirpath) / name, preference[ext]))
        for stem, path, rank_here in entries:
            current = found.get(stem)
            if current is None or rank_here < ranks[stem]:
                found[stem], ranks[stem] = path, rank_here
            if current is not None and twins is not None and not _same_content(current, path):
                twins.append({"image_id": stem, "used": str(found[stem]), "other": str(path if found[stem] == current
                                                                                      else current)})
    close_containers()  # the workers that read the images open their own
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


def apply_task(table: pd.DataFrame, task: str, classes: Sequence[str] = C.DIAGNOSIS_CLASSES) -> pd.DataFrame:
    """Add ``target`` for ``task``; rows unknown for it are dropped.

    Binary tasks (malignant | melanoma | keratosis): 0/1 from that column. ``diagnosis``: the index of the row's
    class in ``classes`` (:func:`kmel.data.diagnosis.diagnosis_classes` maps every source's names); the rows
    with no class are dropped and :func:`diagnosis_drops` counts them by reason."""
    if task == "diagnosis":
        target, _ = diagnosis_classes(table[C.COL_DIAGNOSIS], classes)
        out = table[target >= 0].copy()
        out[C.COL_TARGET] = target[target >= 0].astype(int)
        return out.reset_index(drop=True)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted([*TASKS, 'diagnosis'])}")
    column = TASKS[task]
    out = table[table[column].notna()].copy()
    out[C.COL_TARGET] = out[column].astype(int)
    return out.reset_index(drop=True)


def diagnosis_drops(table: pd.DataFrame, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Why rows have no class for the diagnosis task: reason → {diagnosis as written → rows}."""
    _, reason = diagnosis_classes(table[C.COL_DIAGNOSIS], classes)
    dropped = table.assign(_reason=reason)[reason.notna()]
    out: dict[str, dict[str, int]] = {}
    for (why, name), n in dropped.groupby(["_reason", dropped[C.COL_DIAGNOSIS].fillna("").astype(str)]).size().items():
        out.setdefault(str(why), {})[name or "(empty)"] = int(n)
    return out


def split_table(
    table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
    eval_only_sources: Sequence[str] = C.EVAL_ONLY_SOURCES,
) -> pd.DataFrame:
    """Add ``split``: no patient (or HAM10000 lesion) in two splits; strata of (target, skin tone).

    Rows of ``eval_only_sources`` (DDI's and PAD-UFES-20's clinical photographs by default) all go to ``test`` and never
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

