"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train one tiny segmenter together."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kmel.data.records import build_records
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_train_together_and_agree(tmp_path):
    from kmel.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=48, seed=3, size=96)
    build_records(tmp_path / "data", tmp_path / "rec", tiny_config(), progress=False)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests/scripts/train_tiny.py"), "seg", str(tmp_path / "rec"),
             str(tmp_path / "models"), str(tmp_path / "runs"), "multiworker", "1", "2", "float32",
             json.dumps({"segmenter.steps_per_epoch": 1})],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=900)
        finally:
            for other in procs:
                if other.poll() is None and proc.returncode not in (0, None):
                    other.kill()
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert [r["replicas"] for r in results] == [2, 2], "one cluster of two workers (one CPU replica each)"
    assert results[0]["weights_digest"] == results[1]["weights_digest"]
    assert results[0]["epochs_run"] == results[1]["epochs_run"] == 2
    # Only the chief (worker 0) wrote outputs; worker 1's scratch folder is gone.
    assert (tmp_path / "models" / "segmenter" / "saved_model.pb").exists()
    assert not (tmp_path / "models" / ".worker-1").exists()
    pipeline = json.loads((tmp_path / "models" / "pipeline.json").read_text())
    assert pipeline["segmenter"]["replicas"] == 2


def test_tf_config_read_once_with_clear_errors(monkeypatch):
    from kmel.config import ConfigError
    from kmel.training.distribute import (
        make_strategy,
        multiworker_requested,
        read_tf_config,
        worker_index,
    )

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert read_tf_config() is None and worker_index() == (True, 0)
    assert not multiworker_requested("auto") and multiworker_requested("multiworker")
    with pytest.raises(ConfigError, match="needs TF_CONFIG"):
        make_strategy("multiworker")
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert multiworker_requested("auto") and not multiworker_requested("default")
    assert worker_index() == (False, 0)  # a chief exists, so worker 0 is not it
    monkeypatch.setenv("TF_CONFIG", "{cluster: oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        multiworker_requested("auto")
    monkeypatch.setenv("TF_CONFIG", "[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        worker_index()
