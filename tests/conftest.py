"""Shared fixtures: where the real data is, and tiny synthetic data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data from the repository root, or skip: users' clones do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: real-data test (only on the project's machines)")
    return SHARED_DATA
