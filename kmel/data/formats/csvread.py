"""Lenient reading of a delimited text file: UTF-8 else Windows-1252, `,` / `;` / tab sniffed, lines that do
not fit the header skipped and listed (with their line number) while the rest is read."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd


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
