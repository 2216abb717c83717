"""A threshold per source (``threshold_by_source`` in pipeline.json, ``predict --source NAME``): chosen by the
profile's rule on each source's validation images alone, applied to every input of a ``--source`` run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kmel.config import ConfigError
from kmel.models.pipeline import source_threshold
from tests.handmade import write_handmade_models, write_image
from tests.tiny import tiny_config


def _val_table() -> pd.DataFrame:
    """Source "low" scores every image lower than source "high" (as the union's ISIC images against HAM10000's);
    source "small" has too few malignant images for a threshold of its own."""
    rng = np.random.default_rng(0)
    parts = []
    for source, shift, n_pos in (("high", 0.2, 60), ("low", -0.15, 40), ("small", 0.0, 4)):
        y = np.r_[np.ones(n_pos), np.zeros(150)].astype(int)
        p = np.clip(0.5 + shift + np.where(y == 1, 0.15, -0.15) + rng.normal(0, 0.1, len(y)), 0.001, 0.999)
        parts.append(pd.DataFrame({"target": y, "probability": p, "source": source,
                                   "skin_tone_name": rng.choice(["light", "medium"], len(y))}))
    return pd.concat(parts, ignore_index=True)


def test_each_source_gets_the_rule_on_its_own_validation_images():
    from kmel.training.train import (
        choose_classifier_threshold,
        choose_source_thresholds,
    )

    table = _val_table()
    cc = replace(tiny_config().classifier, threshold_method="sensitivity", target_sensitivity=0.8,
                 threshold_groups=("skin_tone", "source"))
    chosen = choose_source_thresholds(cc, table)
    assert set(chosen) == {"high", "low"}  # "small": 4 malignant images, below MIN_SOURCE_CASES
    for source, entry in chosen.items():
        part = table[table["source"] == source]
        positives = np.sort(part.loc[part["target"] == 1, "probability"].to_numpy())
        recall = (positives >= entry["threshold"]).mean()
        assert recall >= 0.8 and entry["val_sensitivity"] == pytest.approx(recall)
        # the highest such threshold: the next positive score up would miss the target
        higher = positives[positives > entry["threshold"]]
        assert (positives >= higher.min()).mean() < 0.8
        assert entry["n_malignant"] == len(positives) and entry["n"] == len(part)
    assert chosen["low"]["threshold"] < chosen["high"]["threshold"] - 0.2
    # One threshold for all sources misses the target on the low-scoring one.
    overall = choose_classifier_threshold(cc, table)["threshold"]
    low = table[(table["source"] == "low") & (table["target"] == 1)]
    assert (low["probability"] >= overall).mean() < 0.7


def test_source_threshold_looks_up_without_regard_to_case_and_refuses_unknown_sources():
    entry = {"threshold": 0.4, "threshold_by_source": {"ham10000": {"threshold": 0.55}}}
    assert source_threshold(entry) == 0.4 and source_threshold(entry, "HAM10000") == 0.55
    with pytest.raises(ConfigError, match="sources with one: ham10000"):
        source_threshold(entry, "clinic_x")
    with pytest.raises(ConfigError, match="trained before kmel chose them"):
        source_threshold({"threshold": 0.4}, "ham10000")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = write_handmade_models(tmp_path_factory.mktemp("models"))
    pipeline = json.loads((out / "pipeline.json").read_text())
    pipeline["classifier"]["threshold_by_source"] = {"clinic_a": {"threshold": 0.01, "n": 100, "n_malignant": 20}}
    (out / "pipeline.json").write_text(json.dumps(pipeline))
    return out


def test_predict_source_decides_with_that_sources_threshold(models, tmp_path):
    from cli import cli

    images = [write_image(tmp_path / "in" / f"{i}.png", i) for i in range(3)]
    out = tmp_path / "a.csv"

    def invoke(*args):
        return CliRunner().invoke(cli, ["predict", str(tmp_path / "in"), *map(str, args), "--models", str(models),
                                        "--quiet"])

    assert invoke(tmp_path / "all.csv").exit_code == 0
    assert invoke(out, "--source", "Clinic_A").exit_code == 0
    plain, clinic = pd.read_csv(tmp_path / "all.csv"), pd.read_csv(out)
    assert len(clinic) == len(images) and (clinic["threshold"] == 0.01).all() and (plain["threshold"] == 0.5).all()
    np.testing.assert_allclose(clinic["probability"], plain["probability"])
    assert list(clinic["prediction"]) == [int(p >= 0.01) for p in clinic["probability"]]
    assert (plain["prediction"] == 0).any() and (clinic["prediction"] == 1).all()  # the same scores, other decisions
    # Resuming the output under another threshold would mix decisions: refused.
    again = invoke(out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    unknown = invoke(tmp_path / "b.csv", "--source", "clinic_b")
    assert unknown.exit_code == 2 and "sources with one: clinic_a" in unknown.output
    assert not (tmp_path / "b.csv").exists()
