"""Shared fixtures: where the real data is, and tiny synthetic data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> dict:
    """``demo --quick`` run once through the CLI: synthetic data, records, a trained segmenter and
    classifier, predictions and reports. tests/test_demo.py checks the run itself; the end-to-end
    tests (tests/test_pipeline_e2e.py) use its records and models instead of training their own.
    """
    from click.testing import CliRunner

    from cli import cli

    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--n-images", "64"],
                                catch_exceptions=False)
    return {"result": result, "out": out}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data from the repository root, or skip: users' clones do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: real-data test (only on the project's machines)")
    return SHARED_DATA


def _worker_group(item: pytest.Item) -> str | None:
    """Which tests must share a pytest-xdist worker: those using the session's ``quick_demo`` run (one
    group, so the demo trains once), and the tests of a module with a module-scoped fixture (the
    fixture is built once). Other tests go to whichever worker is free."""
    names = getattr(item, "fixturenames", ())
    if "quick_demo" in names:
        return "quick_demo"
    info = getattr(item, "_fixtureinfo", None)
    for name in names:
        defs = info.name2fixturedefs.get(name, ()) if info is not None else ()
        if any(d.scope in ("module", "package", "class") for d in defs):
            return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads ../shared/data (the ``shared_data`` fixture) must carry the ``realdata`` marker,
    so ``-m "not realdata"`` really leaves the real data alone. Under ``--dist loadgroup`` (setup.cfg),
    tests that share an expensive fixture are put in one ``xdist_group``."""
    unmarked = [item.nodeid for item in items
                if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("realdata") is None]
    if unmarked:
        raise pytest.UsageError("tests reading ../shared/data without @pytest.mark.realdata: " + ", ".join(unmarked))
    for item in items:
        group = _worker_group(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def pipeline_reads(monkeypatch) -> list[str]:
    """Every read of a models folder's pipeline.json, whichever kmel module calls ``read_pipeline``: the
    function is replaced where it is defined and in every kmel module that imported it by name."""
    import sys

    import kmel.models.pipeline

    reads: list[str] = []
    original = kmel.models.pipeline.read_pipeline

    def counting(models_dir):
        reads.append(str(models_dir))
        return original(models_dir)

    for name, module in list(sys.modules.items()):
        if name.startswith("kmel") and getattr(module, "read_pipeline", None) is original:
            monkeypatch.setattr(module, "read_pipeline", counting)
    return reads


@pytest.fixture
def weights_server():
    """A static file server on 127.0.0.1 (:class:`tests.loopback.WeightsServer`), closed after the test."""
    from tests.loopback import WeightsServer

    server = WeightsServer()
    yield server
    server.close()
