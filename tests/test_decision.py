"""The diagnosis decision (ClassifierHead.decide): the arg-max of p_c / q_c, q the classes' shares of the training
draws. The rule by hand, the shares through pipeline.json (and old entries without them), the shares the sampler
draws, and the one rule in evaluate's report, predict's ``diagnosis`` column, its Grad-CAM maps, the service and
``evaluate --predictions``. The models are tests/handmade.py's diagnosis classifier, whose arg-max is always MEL and
whose p / q, with the draw shares below, is always BCC; the training that records the shares is
tests/test_diagnosis.py's end-to-end test."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.config import ConfigError, load_config
from kmel.models.heads import ClassifierHead, head_from_entry, head_from_manifest
from tests.handmade import (
    HANDMADE_CLASSES,
    write_handmade_diagnosis_models,
    write_image,
)

SHARES = (0.7, 0.2, 0.1)
HEAD = ClassifierHead("diagnosis", HANDMADE_CLASSES, ("MEL", "BCC"), SHARES)
P_COLUMNS = [f"p_{c}" for c in HANDMADE_CLASSES]


def test_decide_divides_by_the_training_draw_shares():
    p = np.array([[.5, .3, .2], [.9, .05, .05], [.2, .7, .1]])
    assert p.argmax(axis=1).tolist() == [0, 0, 1]
    assert HEAD.decide(p).tolist() == [2, 0, 1]  # row 0: p / q = 0.71, 1.5, 2.0
    plain = replace(HEAD, class_draw_share=None)  # a model from before the shares were recorded
    assert plain.decide(p).tolist() == [0, 0, 1]
    assert "q_c" in HEAD.decision_rule and "no training draw shares" in plain.decision_rule
    assert replace(HEAD, class_draw_share=(7.0, 2.0, 1.0)).decide(p).tolist() == [2, 0, 1]  # only ratios count
    assert replace(HEAD, class_draw_share=(.5, .5, 0.0)).decide([[.2, .1, .7]]).tolist() == [0]  # never drawn
    with pytest.raises(ValueError, match="one output"):
        ClassifierHead().decide([[0.3]])
    for bad in ((.5, .5), (1.0, -.1, .1), (0.0, 0.0, 0.0)):
        with pytest.raises(ValueError, match="class_draw_share"):
            replace(HEAD, class_draw_share=bad)


def test_draw_shares_go_through_pipeline_json_and_old_entries_decide_by_the_arg_max():
    entry = json.loads(json.dumps(HEAD.to_entry()))
    assert entry["class_draw_share"] == {"MEL": .7, "NV": .2, "BCC": .1}
    back = head_from_entry(entry)
    assert back.class_draw_share == SHARES and back.decide([[.5, .3, .2]]).tolist() == [2]
    # the shares say how a class is named, not what the outputs mean: records labelled for these classes suit it
    assert back == head_from_manifest({"task": "diagnosis", "classes": list(HANDMADE_CLASSES),
                                       "malignant_classes": ["MEL", "BCC"]})
    old = head_from_entry({k: v for k, v in entry.items() if k != "class_draw_share"})
    assert old.class_draw_share is None and "class_draw_share" not in old.to_entry()
    assert old.decide([[.5, .3, .2]]).tolist() == [0]
    with pytest.raises(ConfigError, match="no share for"):
        head_from_entry({**entry, "class_draw_share": {"MEL": .7, "NV": .3}})
    assert "class_draw_share" not in ClassifierHead().to_entry()


def test_class_draw_shares_are_the_samplers_class_totals():
    from kmel.data.datasets import (
        balance_weights,
        class_draw_shares,
        group_counts,
        source_counts,
        split_by_source,
    )

    manifest = {"task": "diagnosis", "counts": {"train": {
        "ham10000": {"0": {"light": 40, "dark": 5}, "1": {"light": 300, "medium": 60}, "2": {"very_light": 9}},
        "isic2019": {"0": {"light": 20}, "2": {"dark": 7}}}}}
    config = load_config("cpu-small", {"classifier.class_balance": 0.5, "classifier.source_balance": 0.5})
    cc = config.classifier
    shares = class_draw_shares(manifest, "train", config)
    n = {0: 65, 1: 360, 2: 16}
    root = {c: v ** 0.5 for c, v in n.items()}
    assert shares == pytest.approx({c: r / sum(root.values()) for c, r in root.items()})
    # what make_balanced_records draws from: each (source, class, tone) stream's weight, summed over a class
    streams = split_by_source(balance_weights(group_counts(manifest, "train"), cc.target_malignant_fraction,
                                              cc.skin_tone_balance, cc.class_balance),
                              source_counts(manifest, "train"), cc.source_balance)
    assert shares == pytest.approx({c: sum(w for (_, t, _), w in streams.items() if t == c) for c in n})


def _scored_table() -> pd.DataFrame:
    """Four images of each class; the BCC ones are most probably MEL, but named BCC by p / q."""
    p = np.repeat([[.9, .05, .05], [.2, .7, .1], [.5, .3, .2]], 4, axis=0)
    true_class = np.repeat([0, 1, 2], 4)
    return pd.DataFrame({
        C.COL_IMAGE_ID: [f"ISIC_{i}" for i in range(12)], C.COL_SOURCE: "isic2019",
        C.COL_TARGET: np.isin(true_class, [0, 2]).astype(int), "true_class": true_class,
        "probability": p[:, 0] + p[:, 2], **dict(zip(P_COLUMNS, p.T)),
        C.COL_SKIN_TONE_NAME: np.tile(["light", "dark"], 6),
    })


def test_evaluate_report_is_of_the_decided_class(tmp_path):
    from kmel.evaluation.evaluate import report_from_table

    config = load_config("cpu-small", {"classifier.bootstrap": 20})
    report = report_from_table(_scored_table(), 0.5, tmp_path / "rule", config, {"split": "test"}, head=HEAD)
    diagnosis = report["diagnosis"]
    assert diagnosis["confusion"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert diagnosis["balanced_accuracy"] == 1.0 and diagnosis["argmax_balanced_accuracy"] == pytest.approx(2 / 3)
    assert diagnosis["per_class"]["BCC"]["sensitivity"] == 1.0 and "q_c" in diagnosis["decision"]
    written = pd.read_csv(tmp_path / "rule" / "predictions.csv")
    assert list(written["diagnosis"]) == ["MEL"] * 4 + ["NV"] * 4 + ["BCC"] * 4
    np.testing.assert_allclose(written["probability"], _scored_table()["probability"])  # unchanged
    assert "(plain arg-max of p_c: 0.667)" in (tmp_path / "rule" / "report.md").read_text()

    old = report_from_table(_scored_table(), 0.5, tmp_path / "old", config, {"split": "test"},
                            head=replace(HEAD, class_draw_share=None))["diagnosis"]
    assert old["confusion"] == [[4, 0, 0], [0, 4, 0], [4, 0, 0]] and old["balanced_accuracy"] == pytest.approx(2 / 3)


def _predict(models, inputs, out, *extra: str) -> pd.DataFrame:
    from click.testing import CliRunner

    from kmel.cli import cli

    result = CliRunner().invoke(cli, ["predict", str(inputs), str(out), "--models", str(models), "--quiet", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out)


def test_predict_evaluate_and_grad_cam_name_the_decided_class(tmp_path):
    from kmel.data.images import load_image
    from kmel.evaluation.evaluate import evaluate_predictions
    from kmel.serving.predictor import Predictor

    models = write_handmade_diagnosis_models(tmp_path / "models", dict(zip(HANDMADE_CLASSES, SHARES)))
    images = [write_image(tmp_path / "in" / f"a{i}.png", i) for i in range(3)]
    rows = _predict(models, tmp_path / "in", tmp_path / "pred.csv", "--explain", str(tmp_path / "cams"))
    assert (rows[P_COLUMNS].to_numpy().argmax(axis=1) == 0).all()  # MEL the most probable everywhere ...
    assert list(rows["diagnosis"]) == ["BCC"] * 3  # ... BCC named
    assert list(rows["diagnosis"]) == [HANDMADE_CLASSES[i] for i in HEAD.decide(rows[P_COLUMNS])]
    np.testing.assert_allclose(rows[P_COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rows["probability"], rows["p_MEL"] + rows["p_BCC"], atol=2e-6)
    assert len(list((tmp_path / "cams").glob("*.png"))) == 3

    pixels = [load_image(path) for path in images]
    with Predictor(models, explain=True) as predictor:
        got = predictor.predict(pixels)
    assert [p.diagnosis for p in got] == ["BCC"] * 3
    np.testing.assert_allclose([p.heatmap for p in got], 0.3, atol=1e-6)  # gradcam_class of BCC (index 2)
    with Predictor(models, explain=True, explain_class="NV") as predictor:
        np.testing.assert_allclose([p.heatmap for p in predictor.predict(pixels)], 0.2, atol=1e-6)

    truth = tmp_path / "truth.csv"
    pd.DataFrame({"image": rows["image"], "diagnosis": "basal cell carcinoma"}).to_csv(truth, index=False)
    evaluated = evaluate_predictions(tmp_path / "pred.csv", truth, tmp_path / "eval",
                                     load_config("cpu-small", {"classifier.bootstrap": 20}))["diagnosis"]
    assert evaluated["confusion"][2] == [0, 0, 3] and evaluated["decision"] == "predict's diagnosis column"
    assert evaluated["balanced_accuracy"] == 1.0 and evaluated["argmax_balanced_accuracy"] == 0.0
    assert list(pd.read_csv(tmp_path / "eval" / "predictions.csv")["diagnosis"]) == ["BCC"] * 3

    # A models folder from before the shares were recorded: the plain arg-max, and the gradcam endpoint's map.
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    del pipeline["classifier"]["class_draw_share"]
    (models / C.PIPELINE_JSON).write_text(json.dumps(pipeline))
    old = _predict(models, tmp_path / "in", tmp_path / "old.csv")
    assert list(old["diagnosis"]) == ["MEL"] * 3
    np.testing.assert_allclose(old[P_COLUMNS], rows[P_COLUMNS])  # only the name changed
    with Predictor(models, explain=True) as predictor:
        got = predictor.predict(pixels)
    assert [p.diagnosis for p in got] == ["MEL"] * 3
    np.testing.assert_allclose([p.heatmap for p in got], 0.1, atol=1e-6)


def test_the_service_draws_the_map_of_the_decided_class(tmp_path):
    from kmel.serving.predictor import Predictor
    from kmel.serving.service import ModelService
    from kmel.serving.uploads import Upload

    models = write_handmade_diagnosis_models(tmp_path / "models", dict(zip(HANDMADE_CLASSES, SHARES)))
    data = write_image(tmp_path / "a.png", 0).read_bytes()
    service = ModelService(Predictor(models))
    try:
        asked, gradcam = [], service.gradcam
        service.gradcam = lambda batch, decided: asked.append(list(decided)) or gradcam(batch, decided)
        entries = service.submit([Upload("a.png", data), Upload("b.png", data)], explain=True).result(timeout=120)
    finally:
        service.close()
    assert [e["diagnosis"] for e in entries] == ["BCC", "BCC"] and asked == [[2, 2]]
    assert all(e["gradcam"].startswith("data:image/png") for e in entries)
