"""`demo --quick`: the whole main job (synthetic data → records → seg → crops → cls → predict → evaluate).

The run is the session fixture ``quick_demo`` (tests/conftest.py): the end-to-end tests reuse its models.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(quick_demo):
    out, result = quick_demo["out"], quick_demo["result"]
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
