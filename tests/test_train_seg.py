"""train seg on tiny synthetic records: learns, exports, reloads, is deterministic, resumes, distributes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from kmel import constants as C
from kmel.data.records import build_records
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    from kmel.data.synthetic import make_synthetic_dataset

    data = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(data, n_images=48, seed=3, size=96)
    out = tmp_path_factory.mktemp("records")
    build_records(data, out, tiny_config(), progress=False)
    return out


def _trained_config():
    return tiny_config(epochs=3, **{"segmenter.steps_per_epoch": 4})


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory) -> tuple[Path, dict]:
    from kmel.training.train import fit_segmenter

    models = tmp_path_factory.mktemp("models")
    config = _trained_config()
    entry = fit_segmenter(records, models, config, tmp_path_factory.mktemp("runs"), "default", "float32", verbose=0)
    return models, entry


def test_training_lowers_the_loss_and_writes_outputs(trained):
    models, entry = trained
    history = pd.read_csv(models / "segmenter_history.csv")
    assert len(history) == 3 and entry["epochs_run"] == 3
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    for name in (C.SEGMENTER_KERAS, C.PIPELINE_JSON, "segmenter_config.yaml", "segmenter/saved_model.pb"):
        assert (models / name).exists(), name
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    assert pipeline["segmenter"]["image_size"] == 64 and set(pipeline["segmenter"]["metrics"]) >= {"val"}
    assert {"dice", "iou", "thresholded_jaccard", "loss"} <= set(pipeline["segmenter"]["metrics"]["val"])
    assert not (models / ".run-segmenter").exists(), "a finished run leaves no run folder (or backup) behind"


def test_export_reloads_with_identical_outputs(trained):
    models, _ = trained
    model = keras.saving.load_model(models / C.SEGMENTER_KERAS, safe_mode=True)
    serve = tf.saved_model.load(str(models / C.SEGMENTER_DIR)).signatures["serve"]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    exported = next(iter(serve(tf.constant(x)).values())).numpy()
    np.testing.assert_allclose(exported, model.predict(x, verbose=0), atol=1e-5)
    assert exported.shape == (2, 64, 64, 1) and exported.dtype == np.float32
    assert 0.0 <= exported.min() and exported.max() <= 1.0


def test_same_seed_same_weights(records, trained, tmp_path):
    """A second run with the ``trained`` fixture's config and seed (augmentation on, three epochs, best epoch
    restored) ends with the same weights, bit for bit."""
    from kmel.training.train import fit_segmenter

    entry = fit_segmenter(records, tmp_path / "b", _trained_config(), tmp_path / "runs-b", "default", "float32",
                          verbose=0)
    weights = []
    for models in (trained[0], tmp_path / "b"):
        model = keras.saving.load_model(models / C.SEGMENTER_KERAS)
        weights.append([w.copy() for w in model.get_weights()])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert entry["weights_digest"] == trained[1]["weights_digest"]


def _snapshot(models: Path) -> dict[str, bytes]:
    return {p.relative_to(models).as_posix(): p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()
            if not p.relative_to(models).as_posix().startswith(".run-segmenter/")}


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("simulated kill")


def test_interrupted_mirrored_fit_with_one_replica_resumes_from_last_epoch(records, trained, tmp_path, monkeypatch):
    """An exception in ``fit`` (here at its second epoch; a full disk, a kill) keeps the run's backup and leaves
    the models folder as it was — the trained segmenter, pipeline.json and history untouched (issue 24); a
    resume with another learning rate is refused naming the key; the same command resumes: epoch 0
    before, 1-2 after.

    Under MirroredStrategy on one device (a user's single GPU, or this CPU), and the resumed ``fit`` goes
    past its first epoch: the validation data must be repeated under any distribution strategy, not
    only with two replicas. A real SIGKILL under two replicas (the same run folder and backup): the classifier's,
    tests/test_pipeline_e2e.py."""
    import shutil

    import kmel.training.train as train
    from kmel.config import ConfigError

    models = Path(shutil.copytree(trained[0], tmp_path / "m"))
    before = _snapshot(models)
    config = tiny_config(epochs=3, **{"segmenter.steps_per_epoch": 2})
    original = train._callbacks

    def with_interrupt(*args, **kwargs):
        callbacks, best = original(*args, **kwargs)
        return callbacks + [_Interrupt()], best

    monkeypatch.setattr(train, "_callbacks", with_interrupt)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train.fit_segmenter(records, models, config, tmp_path / "runs", "mirrored", "float32", verbose=0)
    work = models / ".run-segmenter"
    assert (work / ".backup-segmenter").exists()
    assert pd.read_csv(work / "segmenter_history.csv")["epoch"].tolist() == [0]
    assert _snapshot(models) == before, "the trained segmenter, pipeline.json and history are untouched"
    monkeypatch.setattr(train, "_callbacks", original)
    faster = tiny_config(epochs=3, **{"segmenter.steps_per_epoch": 2, "segmenter.learning_rate": 0.05})
    with pytest.raises(ConfigError, match="segmenter.learning_rate"):
        train.fit_segmenter(records, models, faster, tmp_path / "runs", "mirrored", "float32", verbose=0)
    assert _snapshot(models) == before
    entry = train.fit_segmenter(records, models, config, tmp_path / "runs", "mirrored", "float32", verbose=0)
    epochs = pd.read_csv(models / "segmenter_history.csv")["epoch"].tolist()
    assert epochs == [0, 1, 2], "epoch 0 before the kill, 1-2 after: none repeated, none lost"
    assert entry["epochs_run"] == 3 and entry["replicas"] == 1
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    assert pipeline["segmenter"]["fingerprint"] == entry["fingerprint"] != trained[1]["fingerprint"]
    assert not work.exists()


def test_restart_drops_an_interrupted_run_and_a_fresh_run_clears_leftovers(tmp_path):
    from kmel.training.run_folder import backup_folder, start_run

    work = start_run(tmp_path, "segmenter", {"segmenter.learning_rate": 0.1})
    backup_folder(work, "segmenter").mkdir()
    (work / "segmenter_history.csv").write_text("epoch\n0\n")
    assert start_run(tmp_path, "segmenter", {"segmenter.learning_rate": 0.1}) == work  # resumed: kept
    assert (work / "segmenter_history.csv").exists()
    start_run(tmp_path, "segmenter", {"segmenter.learning_rate": 0.2}, restart=True)
    assert not (work / "segmenter_history.csv").exists() and not backup_folder(work, "segmenter").exists()
    (work / "leftover.h5").write_text("a failed run's")  # no backup: not resumable, so cleared
    start_run(tmp_path, "segmenter", {"segmenter.learning_rate": 0.3})
    assert not (work / "leftover.h5").exists()


def test_mirrored_two_cpus_match_one_device_with_the_same_global_batch():
    """Two replicas of batch b = one device with batch 2b, BatchNorm statistics and all (3 SGD steps)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/scripts/mirrored_vs_one.py")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["moved"] > 1e-3, "the steps changed the weights"
    assert result["max_diff"] < 1e-4, result
