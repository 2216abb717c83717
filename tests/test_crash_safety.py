"""Killed runs (real SIGKILL) leave nothing half-read, and a rerun ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _profile(tmp: Path) -> Path:
    data: dict = {}
    for key, value in TINY.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    data["records"]["shard_size"] = 8
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _build_cmd(data: Path, out: Path, profile: Path) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "build-records", "--data-dir", str(data), "--out", str(out),
            "--profile", str(profile), "--quiet"]


def _build(data: Path, out: Path, profile: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(_build_cmd(data, out, profile), cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _kill_when(cmd: list[str], progressed: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it the moment ``progressed()`` is true; fail if it ended before that."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not progressed():
        time.sleep(0.002)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "build-records ended before the kill point: " + proc.stderr.read().decode()[-2000:]


def test_build_records_killed_and_rerun_gives_identical_manifest(tmp_path):
    from kmel.data.synthetic import make_synthetic_dataset
    from kmel.data.tfrecord import file_sha256

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_images=64, seed=11, size=96)
    profile = _profile(tmp_path)
    _build(data, tmp_path / "clean", profile)
    reference = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    whole = {e["file"]: e["sha256"] for kind in ("img", "seg") for es in reference["shards"][kind].values() for e in es}

    out = tmp_path / "killed"

    def preparing() -> bool:  # some images prepared (cache files), no shard started yet
        return any(out.glob(".prepare-*/*.prep"))

    def writing() -> bool:  # a shard being written (temporary name) or finished
        return any(out.glob("*.tfrecord*"))

    for progressed in (preparing, writing):
        _kill_when(_build_cmd(data, out, profile), progressed)
        assert not (out / "manifest.json").exists(), "killed before the end: no manifest"
        # A shard under its final name is whole: byte-identical to the clean run's shard.
        for shard in out.glob("*.tfrecord"):
            assert file_sha256(shard) == whole[shard.name], f"{shard.name} half-written under its final name"
    assert any(out.glob(".prepare-*/*.prep")), "the kills left prepared images to reuse"

    _build(data, out, profile)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed == reference
    assert sorted(p.name for p in out.glob("*.tfrecord*")) == sorted(whole), "no temporary or stale shard left"
    for name, sha in whole.items():
        assert file_sha256(out / name) == sha


# A training run killed mid-fit: the classifier under two replicas, a real SIGKILL (tests/test_pipeline_e2e.py);
# the segmenter, an exception inside fit under MirroredStrategy (tests/test_train_seg.py). Both resume through
# the same run folder and backup (kmel/training/run_folder.py, train._callbacks).
