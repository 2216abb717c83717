"""``predict``'s output file: rows in CSV or JSONL, appended and fsynced batch by batch, and beside it
``OUT.meta.json``, which says which models (their fingerprints) and options wrote the rows.

Resuming is keyed on each input's ``relpath`` and its absolute path: a file already in the output, under
either, is not predicted again, so a rerun after a kill, or with one more input folder (which changes the
common folder the relpaths are taken from), writes no duplicates. Rows with ``status=error`` are dropped
when a run resumes, so those files are tried again. An output written by other models or with other
options (``tta``, runtime, TFLite precision) is refused rather than mixed, unless the caller starts it afresh.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kmel
from kmel.config import ConfigError

COLUMNS = (
    "image", "relpath", "path", "probability", "prediction", "label", "threshold", "skin_tone_group", "ita",
    "ita_category", "crop_mode", "box_x0", "box_y0", "box_x1", "box_y1", "tta", "status", "error",
)
FORMATS = ("csv", "jsonl")


def output_columns(class_columns: Sequence[str] = (), fused: bool = False) -> tuple[str, ...]:
    """The columns of a predict output: a diagnosis model's ``p_<CLASS>`` columns and ``diagnosis`` come
    after the file's names, then the yes/no columns every model writes; with ``fused`` (``--metadata``),
    ``image_probability`` and ``fused`` follow ``probability``."""
    columns = COLUMNS if not class_columns else (*COLUMNS[:3], *class_columns, "diagnosis", *COLUMNS[3:])
    if fused:
        at = columns.index("probability") + 1
        columns = (*columns[:at], "image_probability", "fused", *columns[at:])
    return columns

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
META_SUFFIX = ".meta.json"
# What must match for rows to be appended to an output: the models and the options that change scores.
IDENTITY_KEYS = ("segmenter_fingerprint", "classifier_fingerprint", "threshold", "temperature", "tta", "runtime",
                 "precision", "fusion", "source")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula gets a leading apostrophe (CSV injection).

    Numbers written as text (``-22.11``) are numbers, not formulas, and stay as they are.
    """
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a file name that were not UTF-8 (held by Python as surrogates)
    become ``\\xff``-style escapes, the same on every run, so such a file keeps its row and resumes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def format_for(path: str | Path) -> str:
    """``jsonl`` for ``.jsonl`` / ``.ndjson`` files, else ``csv``."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "csv"


def meta_path(out: str | Path) -> Path:
    return Path(str(out) + META_SUFFIX)


def output_identity(pipeline: dict[str, Any], models_dir: str | Path, tta: bool, runtime: str,
                    tflite_precision: str, fused: bool = False, source: str | None = None) -> dict[str, Any]:
    """What wrote an output's rows: the models (fingerprints from pipeline.json, which the load verifies)
    and the options that change the scores or decisions (``fused``: ``--metadata``, naming the fusion model's
    SHA-256; ``source``: ``--source``, whose threshold decides)."""
    classifier = pipeline.get("classifier", {})
    return {
        **({"source": source.lower()} if source is not None else {}),
        "kmel_version": kmel.__version__, "models": os.path.abspath(models_dir),
        "segmenter_fingerprint": pipeline.get("segmenter", {}).get("fingerprint"),
        "classifier_fingerprint": classifier.get("fingerprint"),
        "threshold": classifier.get("threshold"), "temperature": classifier.get("temperature", 1.0),
        "tta": bool(tta), "runtime": runtime, "precision": tflite_precision if runtime == "tflite" else "float32",
        "fusion": pipeline.get("fusion", {}).get("sha256") if fused else None,
    }


def _output_error(path: Path, exc: OSError, doing: str) -> ConfigError:
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        fix = "it is a folder: give a file name (e.g. predictions.csv)"
    elif isinstance(exc, (NotADirectoryError, FileExistsError)):
        fix = "a part of its folder path is a file: choose another location"
    elif isinstance(exc, PermissionError):
        fix = "you may not write there: choose a folder you can write to"
    elif exc.errno == 28:
        fix = "the disk is full: free space and rerun the same command (rows written so far are kept)"
    else:
        fix = "choose another output file"
    return ConfigError(f"cannot {doing} {path} ({reason}): {fix}")


class RowsFile:
    """An output file of predict rows (CSV or JSONL), appended and fsynced batch by batch."""

    def __init__(self, path: str | Path, fmt: str | None = None, columns: Sequence[str] = COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.fmt = fmt or format_for(self.path)
        if self.fmt not in FORMATS:
            raise ConfigError(f"unknown output format {self.fmt!r}; known: {', '.join(FORMATS)}")
        self._handle: Any = None
        self._csv: Any = None

    def _rows(self) -> list[dict[str, Any]]:
        """The rows an earlier (possibly killed) run wrote; a torn last line is cut off."""
        if self.path.is_dir():
            raise _output_error(self.path, IsADirectoryError(21, "Is a directory"), "write")
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        try:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
                self.path.write_bytes(data)
        except OSError as exc:
            raise _output_error(self.path, exc, "read and resume") from None
        wrong = ConfigError(f"{self.path} exists and is not a kmel predict {self.fmt.upper()} of this version: "
                            "choose another output file or delete it")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise wrong from None
        if self.fmt == "csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if tuple(reader.fieldnames or ()) != self.columns:
                raise wrong
            return list(reader)
        rows = []
        for line in text.split("\n")[:-1]:  # not splitlines(): U+2028 may sit inside a JSON string
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise wrong from None
            if not isinstance(row, dict) or "relpath" not in row:
                raise wrong
            rows.append(row)
        return rows

    def read_rows(self) -> list[dict[str, Any]]:
        """Every row in the file (CSV values as text)."""
        return self._rows()

    def rewrite(self, rows: Sequence[dict[str, Any]]) -> None:
        """Replace the file's rows (written whole, fsynced, then renamed into place)."""
        self._rewrite(rows)

    def done(self) -> set[str]:
        """The ``relpath`` and absolute ``path`` of every row an earlier run wrote that is not an error;
        error rows are removed from the file here, so their files are tried again."""
        rows = self._rows()
        kept = [row for row in rows if row.get("status") != "error"]
        if len(kept) < len(rows):
            self._rewrite(kept)
        done = {row["relpath"] for row in kept}
        done.update(os.path.abspath(row["path"]) for row in kept if row.get("path"))
        return done

    def _rewrite(self, rows: Sequence[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                if self.fmt == "csv":
                    writer = csv.DictWriter(handle, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows({k: row.get(k, "") for k in self.columns} for row in rows)
                else:
                    handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _output_error(self.path, exc, "rewrite") from None

    def check_identity(self, identity: dict[str, Any], overwrite: bool = False) -> None:
        """Refuse to append to rows other models or options wrote (``overwrite``: start afresh instead);
        record ``identity`` in ``OUT.meta.json`` before any row is written."""
        if self.path.is_dir():
            raise _output_error(self.path, IsADirectoryError(21, "Is a directory"), "write")
        meta = meta_path(self.path)
        has_rows = self.path.is_file() and self.path.stat().st_size > 0
        if overwrite:
            self.path.unlink(missing_ok=True)
        elif has_rows:
            self._rows()  # not a kmel predict output at all: that error first
            if not meta.is_file():
                raise ConfigError(f"{self.path} has rows but no {meta.name} saying which models wrote them (an older "
                                  "kmel, or another tool): pass --overwrite to start it afresh, or choose another output")
            try:
                before = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                before = {}
            differ = [k for k in IDENTITY_KEYS if before.get(k) != identity.get(k)]
            if differ:
                what = "; ".join(f"{k}: {before.get(k)!r} in the file, {identity.get(k)!r} now" for k in differ)
                raise ConfigError(f"{self.path} was written by other models or options ({what}): appending would mix "
                                  "them. Pass --overwrite to start it afresh, or choose another output file")
        tmp = meta.with_name(meta.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, meta)
        except OSError as exc:
            raise _output_error(meta, exc, "write") from None

    def __enter__(self) -> RowsFile:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._handle = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as exc:
            raise _output_error(self.path, exc, "write") from None
        if self.fmt == "csv":
            self._csv = csv.DictWriter(self._handle, fieldnames=self.columns)
            if new:
                self.write_header()
        return self

    def write_header(self) -> None:
        try:
            self._csv.writeheader()
        except OSError as exc:
            raise _output_error(self.path, exc, "write") from None

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        try:
            for row in rows:
                if self.fmt == "csv":
                    self._csv.writerow({k: escape_cell(row.get(k, "")) for k in self.columns})
                else:
                    self._handle.write(json.dumps({k: row.get(k) for k in self.columns}, ensure_ascii=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise _output_error(self.path, exc, "write") from None

    def __exit__(self, *exc: object) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # the error that stopped the writes is the one reported
