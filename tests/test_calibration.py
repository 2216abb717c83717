"""The temperature stored in pipeline.json is applied by predict, and the threshold is on that scale."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kmel.models.pipeline import apply_temperature
from tests.test_predict import models  # noqa: F401  (the hand-written SavedModels fixture)


def test_predict_applies_the_stored_temperature(models, tmp_path):  # noqa: F811
    from kmel.serving.predictor import Predictor

    calibrated_dir = tmp_path / "models"
    shutil.copytree(models, calibrated_dir)
    pipeline = json.loads((calibrated_dir / "pipeline.json").read_text())
    pipeline["classifier"].update(temperature=2.0, threshold=0.45)
    (calibrated_dir / "pipeline.json").write_text(json.dumps(pipeline))

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), np.full((30, 30, 3), 250, np.uint8),
              np.full((30, 30, 3), 20, np.uint8)]
    with Predictor(models) as plain, Predictor(calibrated_dir) as calibrated:
        raw = np.array([p.probability for p in plain.predict(images)])
        out = calibrated.predict(images)
    got = np.array([p.probability for p in out])
    assert got == pytest.approx(apply_temperature(raw, 2.0), abs=1e-6)
    assert not np.allclose(got, raw)  # T = 2 pulls every score towards 0.5
    assert [p.prediction for p in out] == [int(v >= 0.45) for v in got]
    assert all(p.threshold == 0.45 for p in out)
