"""`demo --quick`: the whole main job (synthetic data → records → seg → crops → cls → predict → evaluate)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(tmp_path):
    from cli import cli

    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--n-images", "48"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for stage in ("make-synthetic", "build-records", "train seg", "crops + train cls", "predict", "evaluate"):
        assert f"[demo] {stage} done" in result.output
    assert "tensorboard --logdir" in result.output
    pipeline = json.loads((out / "saved_models" / "pipeline.json").read_text())
    assert {"segmenter", "classifier"} <= set(pipeline)
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 8 and (predictions["status"] == "ok").all()
    assert (out / "reports" / "report.json").exists() and (out / "saved_models" / "report" / "report.md").exists()
    assert any((out / "runs").rglob("events.out.tfevents.*"))
