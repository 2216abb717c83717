"""The metadata CSVs kmel recognises by their header: one module per source family, each registering its
readers with :func:`register_format` (tried in this import order). A new format is one reader in a module
here, one fixture and one test in ``tests/test_metadata_formats.py``."""

# isort: off  (registration order is the order formats are tried in)
from kmel.data.formats import isic, ham10000, fitzpatrick, archive, isic2024, ddi, pad_ufes, custom, kmel_outputs  # noqa: F401, I001, E501
# isort: on
from kmel.data.formats.csvread import CsvTable, read_csv_table
from kmel.data.formats.kmel_outputs import in_kmel_output_folder
from kmel.data.formats.registry import (
    COL_DROP_REASON,
    COL_FITZPATRICK_GROUP,
    FORMATS,
    STANDARD_COLUMNS,
    YEARS,
    CsvFormat,
    ParsedCsv,
    identify_format,
    read_metadata_csv,
    read_metadata_file,
    register_format,
    resembles,
)

__all__ = [
    "COL_DROP_REASON", "COL_FITZPATRICK_GROUP", "FORMATS", "STANDARD_COLUMNS", "YEARS", "CsvFormat", "CsvTable",
    "ParsedCsv", "identify_format", "in_kmel_output_folder", "read_csv_table", "read_metadata_csv",
    "read_metadata_file", "register_format", "resembles",
]
