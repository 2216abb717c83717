"""Killed runs (real SIGKILL) leave nothing half-read, and a rerun ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.processes import kill_after_epochs
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


def _build(data: Path, out: Path, profile: Path, kill_after: float | None = None) -> int:
    cmd = [sys.executable, str(REPO / "cli.py"), "build-records", "--data-dir", str(data), "--out", str(out),
           "--profile", str(profile), "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return proc.returncode
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_build_records_killed_and_rerun_gives_identical_manifest(tmp_path):
    from kmel.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_images=64, seed=11, size=96)
    profile = _profile(tmp_path)
    _build(data, tmp_path / "clean", profile)
    reference = json.loads((tmp_path / "clean" / "manifest.json").read_text())

    out = tmp_path / "killed"
    # Kill at several points: during start-up, while preparing images, while writing shards.
    for delay in (2.0, 5.0, 7.5):
        _build(data, out, profile, kill_after=delay)
        if (out / "manifest.json").exists():
            break
        # Whatever a killed run left, no shard is ever half-written under its final name.
        for shard in out.glob("*.tfrecord"):
            assert not shard.name.endswith(".tmp")
    _build(data, out, profile)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed == reference
    from kmel.tfrecord import file_sha256

    for kind in ("img", "seg"):
        for entries in resumed["shards"][kind].values():
            for entry in entries:
                assert file_sha256(out / entry["file"]) == entry["sha256"]


@pytest.mark.parametrize("model", ["seg"])  # cls: tests/test_pipeline_e2e.py, under MirroredStrategy
def test_train_killed_mid_run_resumes_from_last_epoch(tmp_path, model):
    """SIGKILL after two finished epochs; the same command again ends with every epoch exactly once."""
    from kmel.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=48, seed=4, size=96)
    profile = _profile(tmp_path)
    data = yaml.safe_load(profile.read_text())
    for section in ("segmenter", "classifier"):
        data[section].update(epochs=4, steps_per_epoch=2)
    data["segmenter"]["epochs"] = 1 if model == "cls" else 4
    profile.write_text(yaml.safe_dump(data))
    _build(tmp_path / "data", tmp_path / "rec", profile)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    models = tmp_path / "models"

    def cmd(which: str) -> list[str]:
        return [sys.executable, str(REPO / "cli.py"), "train", which, "--records", str(tmp_path / "rec"),
                "--out", str(models), "--profile", str(profile), "--logdir", str(tmp_path / "runs"), "--quiet"]

    if model == "cls":  # the classifier needs a segmenter (and its crops) first
        subprocess.run(cmd("seg"), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    name = "segmenter" if model == "seg" else "classifier"
    history = models / f"{name}_history.csv"
    kill_after_epochs(cmd(model), history, 2, REPO, env)
    assert (models / f".backup-{name}").exists(), "a killed run leaves its backup"
    rerun = subprocess.run(cmd(model), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    import pandas as pd

    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs == [0, 1, 2, 3], "no epoch repeated or lost across the kill"
    pipeline = json.loads((models / "pipeline.json").read_text())
    assert pipeline[name]["epochs_run"] == 4
    assert not (models / f".backup-{name}").exists()
