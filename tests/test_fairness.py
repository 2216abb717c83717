"""Threshold choice and fairness numbers against values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.evaluation.calibration import expected_calibration_error, fit_temperature
from kmel.evaluation.fairness import (
    age_bands,
    choose_threshold,
    fairness_report,
    rank_gaps,
    summary_metrics,
    tone_agreement,
)
from kmel.models.pipeline import apply_temperature


def test_f1_threshold_known_optimum():
    # scores sorted: 0.1(0) 0.3(1) 0.4(0) 0.6(1) 0.7(0) 0.9(1)
    y = [0, 1, 0, 1, 0, 1]
    s = [0.1, 0.3, 0.4, 0.6, 0.7, 0.9]
    # t=0.3: tp3 fp2 -> P=.6 R=1 F1=.75 ; t=0.6: tp2 fp1 -> F1=.667 ; t=0.9: F1=.5 ; t=0.1: F1=.667
    got = choose_threshold(y, s, method="f1")
    assert got["threshold"] == pytest.approx(0.3) and got["f1"] == pytest.approx(0.75)


def test_youden_and_sensitivity_targets():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.5, 0.8, 0.9]
    # t=0.8: TPR 2/3 FPR 0 -> J .667 ; t=0.5: TPR 1, FPR 1/3 -> J .667 ; tie -> first (lower) threshold 0.5
    assert choose_threshold(y, s, method="youden")["threshold"] == pytest.approx(0.5)
    # highest threshold with recall >= 0.6: 0.8 (recall 2/3)
    got = choose_threshold(y, s, method="sensitivity", target_sensitivity=0.6)
    assert got["threshold"] == pytest.approx(0.8) and got["floor_met"]


def test_group_floor_lowers_the_threshold_for_the_worst_group():
    #   group A positives score high, group B's one positive scores 0.35
    y = [1, 1, 1, 0, 0, 1, 0, 0]
    s = [0.9, 0.85, 0.8, 0.5, 0.4, 0.35, 0.3, 0.1]
    g = ["A", "A", "A", "A", "B", "B", "B", "B"]
    plain = choose_threshold(y, s, method="f1")
    assert plain["threshold"] == pytest.approx(0.8)  # F1 = 2*3/(2*3+0+1) = .857
    floor = choose_threshold(y, s, method="f1_group_floor", groups=g, min_group_recall=1.0)
    # Only thresholds <= 0.35 give B recall 1: t=0.35 -> tp4 fp2 -> F1 = 8/10 = .8 (best among them)
    assert floor["threshold"] == pytest.approx(0.35) and floor["floor_met"]
    assert floor["f1"] == pytest.approx(0.8) and floor["worst_group_recall"] == 1.0


def test_group_floor_impossible_is_reported():
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.6]
    got = choose_threshold(y, s, method="f1_group_floor", groups=["A", "A", "B", "B"], min_group_recall=1.01)
    assert got["floor_met"] is False


def test_fairness_numbers_by_hand():
    # threshold 0.5
    y = [1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1]
    s = [.9, .2, .7, .1, .8, .3, .6, .4, .2, .1, .9, .95]
    g = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    # a: y 1 1 0 0  p 1 0 1 0 -> tp1 fn1 fp1 tn1: acc .5 rec .5 prec .5 sel .5
    # b: y 1 0 0 1  p 1 0 1 0 -> tp1 fn1 fp1 tn1: acc .5 rec .5 prec .5 sel .5
    # c: y 0 0 0 1  p 0 0 1 1 -> tp1 fp1 tn2:      acc .75 rec 1 prec .5 sel .5
    rep = fairness_report(y, s, 0.5, {"skin_tone": g}, n_bootstrap=0)["skin_tone"]
    a, c = rep["groups"]["a"], rep["groups"]["c"]
    assert (a["accuracy"], a["recall"], a["precision"], a["selection_rate"]) == (0.5, 0.5, 0.5, 0.5)
    assert (c["accuracy"], c["recall"], c["precision"]) == (0.75, 1.0, 0.5)
    assert c["n"] == 4 and c["n_positive"] == 1
    assert c["auc"] == pytest.approx(1.0)  # the one positive (.95) outranks all negatives
    assert rep["gaps"]["recall"]["max_minus_min"] == pytest.approx(0.5)
    assert rep["gaps"]["accuracy"]["max_minus_min"] == pytest.approx(0.25)
    # equalized odds: TPR a .5 b .5 c 1 -> .5 ; FPR a .5 b .5 c 1/3 -> 1/6 ; max = .5
    assert rep["equalized_odds_difference"] == pytest.approx(0.5)
    assert rep["demographic_parity_difference"] == pytest.approx(0.0)


def test_one_class_group_auc_is_none_and_json_safe():
    y = [0, 0, 1, 0, 1, 1]
    s = [.1, .6, .7, .2, .8, .4]
    rep = fairness_report(y, s, 0.5, {"skin_tone": ["a", "a", "b", "b", "b", "b"]}, n_bootstrap=50)
    assert rep["skin_tone"]["groups"]["a"]["auc"] is None and rep["skin_tone"]["groups"]["a"]["recall"] is None
    json.dumps(rep, allow_nan=False)


def test_bootstrap_intervals_contain_estimate_and_shrink_with_size():
    rng = np.random.default_rng(1)
    big_y = (rng.uniform(size=2000) < 0.3).astype(int)
    small_y = big_y[:60]
    s_big = np.clip(big_y * 0.4 + rng.uniform(size=2000) * 0.6, 0, 1)
    y = np.concatenate([big_y, small_y])
    s = np.concatenate([s_big, s_big[:60]])
    g = ["big"] * 2000 + ["small"] * 60
    rep = fairness_report(y, s, 0.5, {"g": g}, n_bootstrap=300, seed=3)["g"]["groups"]
    for name in ("big", "small"):
        lo, hi = rep[name]["ci95"]["accuracy"]
        assert lo <= rep[name]["accuracy"] <= hi
    width = {n: rep[n]["ci95"]["accuracy"][1] - rep[n]["ci95"]["accuracy"][0] for n in rep}
    assert width["small"] > 2 * width["big"]
    again = fairness_report(y, s, 0.5, {"g": g}, n_bootstrap=300, seed=3)["g"]["groups"]
    assert again["small"]["ci95"] == rep["small"]["ci95"]


def test_summary_metrics_by_hand():
    m = summary_metrics([1, 0, 1, 0], [0.9, 0.6, 0.4, 0.1], 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5 and m["auc"] == pytest.approx(0.75)


def _scored_table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    return pd.DataFrame({
        C.COL_IMAGE_ID: [f"ISIC_{i:07d}" for i in range(n)],
        C.COL_SOURCE: rng.choice(["isic2020", "isic_archive", "ddi"], size=n, p=[0.5, 0.45, 0.05]),
        C.COL_TARGET: y,
        "probability": np.clip(y * 0.3 + rng.uniform(size=n) * 0.7, 0, 1),
        C.COL_SKIN_TONE_NAME: rng.choice(["very_light", "light", "dark"], size=n),
        C.COL_SEX: rng.choice(["male", "female", None], size=n),
        C.COL_AGE: rng.choice([25.0, 50.0, 70.0, np.nan], size=n),
        C.COL_SITE: rng.choice(["torso", "head/neck"], size=n),
        "fitzpatrick_group": rng.choice(["I-II", "III-IV", "V-VI", None], size=n),
    })


def test_report_files(tmp_path):
    from kmel.config import load_config
    from kmel.evaluation.evaluate import report_from_table

    config = load_config("cpu-small", {"classifier.bootstrap": 50})
    report_from_table(_scored_table(), 0.5, tmp_path, config, {"split": "test", "threshold_from": "val"})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    # Every per-group number recomputed from predictions.csv, not compared with the dict that wrote it.
    rows = pd.read_csv(tmp_path / "predictions.csv")
    assert (rows["prediction"] == (rows["probability"] >= 0.5)).all()
    grouping_column = {"skin_tone": C.COL_SKIN_TONE_NAME, "sex": C.COL_SEX, "source": C.COL_SOURCE,
                       "anatomic_site": C.COL_SITE, "fitzpatrick": "fitzpatrick_group"}
    for grouping, column in grouping_column.items():
        groups = on_disk["fairness"][grouping]["groups"]
        values = rows[column].fillna("unknown").astype(str)
        assert sorted(groups) == sorted(values.unique()), grouping
        for name, got in groups.items():
            part = rows[values == name]
            tp = int(((part["prediction"] == 1) & (part[C.COL_TARGET] == 1)).sum())
            fp = int(((part["prediction"] == 1) & (part[C.COL_TARGET] == 0)).sum())
            assert got["n"] == len(part) and got["n_positive"] == int(part[C.COL_TARGET].sum())
            assert got["accuracy"] == pytest.approx((part["prediction"] == part[C.COL_TARGET]).mean())
            assert got["recall"] == pytest.approx(tp / part[C.COL_TARGET].sum())
            assert got["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
            assert got["small"] == (len(part) < 30)
    ages = on_disk["fairness"]["age_band"]["groups"]
    assert list(ages) == ["<30", "45-59", "60-74", "unknown"]
    assert ages["60-74"]["n"] == int((rows[C.COL_AGE] == 70).sum())
    assert on_disk["summary"]["n"] == len(rows) and on_disk["summary"]["tp"] == int(
        ((rows["prediction"] == 1) & (rows[C.COL_TARGET] == 1)).sum())
    md = (tmp_path / "report.md").read_text()
    assert "| very_light |" in md and "threshold" in md.lower()
    for section in ("## By fitzpatrick", "## By age band", "## Largest gaps", "## Calibration",
                    "## Estimated skin tone vs annotated Fitzpatrick type"):
        assert section in md
    for name in ("roc.png", "pr.png", "groups.png", "calibration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Degenerate input: one class only must not crash.
    from kmel.evaluation.report import write_report

    write_report(tmp_path / "one", np.zeros(10), np.linspace(0, 1, 10), 0.5, {"skin_tone": ["a"] * 10}, n_bootstrap=10)


def test_small_and_unknown_groups_are_shown_but_not_ranked():
    rng = np.random.default_rng(2)
    g = np.array(["a"] * 200 + ["b"] * 200 + ["tiny"] * 10 + ["unknown"] * 50)
    y = (rng.uniform(size=len(g)) < 0.4).astype(int)
    s = np.where(g == "a", y * 0.6 + rng.uniform(size=len(g)) * 0.4, rng.uniform(size=len(g)))
    s[g == "tiny"] = 1 - y[g == "tiny"]  # every tiny-group case wrong: the largest gap, from 10 images
    rep = fairness_report(y, s, 0.5, {"x": g}, n_bootstrap=200, seed=0, min_group_size=30)
    x = rep["x"]
    assert x["groups"]["tiny"]["small"] and not x["groups"]["a"]["small"] and "unknown" in x["groups"]
    assert x["gaps"]["accuracy"]["lowest"] == "tiny"  # shown
    assert {x["ranked_gaps"]["accuracy"]["lowest"], x["ranked_gaps"]["accuracy"]["highest"]} == {"a", "b"}
    lo, hi = x["ranked_gaps"]["accuracy"]["ci95"]
    assert lo <= x["ranked_gaps"]["accuracy"]["max_minus_min"] <= hi
    acc = {n: x["groups"][n]["accuracy"] for n in ("a", "b")}
    assert x["ranked_gaps"]["accuracy"]["max_minus_min"] == pytest.approx(abs(acc["a"] - acc["b"]))
    ranking = rank_gaps(rep)
    assert ranking and all(r["lowest"] in ("a", "b") and r["highest"] in ("a", "b") for r in ranking)
    assert [r["max_minus_min"] for r in ranking] == sorted((r["max_minus_min"] for r in ranking), reverse=True)


def test_age_bands():
    assert list(age_bands([5, 30, 44.9, 45, 74, 75, np.nan])) == ["<30", "30-44", "30-44", "45-59", "60-74", "75+",
                                                                   "unknown"]


def test_expected_calibration_error_by_hand():
    # bin [0.1,0.2): p .1 .1, y 0 1 -> |.5-.1| = .4 ; bin [0.9,1]: p .9 .9, y 1 1 -> |1-.9| = .1 ; ECE = (2*.4+2*.1)/4
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.25)
    # one image a bin: |0-.1|, |0-.3|, |1-.9|, |1-.7| -> .2 (one bin for all would give |.5-.5| = 0)
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.3, 0.9, 0.7]) == pytest.approx(0.2)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)


def test_temperature_recovers_overconfidence_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=20000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.08)
    calibrated = apply_temperature(overconfident, t)
    assert np.all(np.diff(calibrated[np.argsort(overconfident)]) >= 0)  # monotone: same ranking, same AUC
    assert expected_calibration_error(y, calibrated) < 0.02 < expected_calibration_error(y, overconfident)
    assert fit_temperature([1, 1], [0.2, 0.9]) == 1.0  # one class: nothing to fit


def test_tone_agreement_confusion_and_spearman():
    annotated = ["I-II", "I-II", "III-IV", "V-VI", "V-VI", "unknown"]
    estimated = ["very_light", "light", "medium", "dark", "tan", "dark"]
    got = tone_agreement(annotated, estimated, C.SKIN_TONE_GROUPS)
    assert got["n"] == 5
    assert got["confusion"]["I-II"] == {"very_light": 1, "light": 1, "medium": 0, "tan": 0, "dark": 0}
    assert got["confusion"]["V-VI"]["dark"] == 1 and got["confusion"]["V-VI"]["tan"] == 1
    # ranks a: 0 0 1 2 2 ; e: 0 1 2 4 3 -> Spearman on average ranks
    from scipy.stats import spearmanr

    assert got["spearman_rho"] == pytest.approx(spearmanr([0, 0, 1, 2, 2], [0, 1, 2, 4, 3]).statistic)
    assert got["spearman_rho"] > 0.8
    assert tone_agreement(["unknown"], ["dark"], C.SKIN_TONE_GROUPS) is None


def test_subgroups_come_from_the_records_metadata(tmp_path):
    from kmel.evaluation.evaluate import report_groups, with_record_metadata

    crops = tmp_path / "crops-abc"
    crops.mkdir()
    pd.DataFrame({C.COL_IMAGE_ID: ["A", "B", "C"], C.COL_SEX: ["male", "female", None], C.COL_AGE: [80, 20, None],
                  C.COL_SITE: ["torso", None, "palms/soles"], "fitzpatrick_group": [None, "V-VI", None],
                  C.COL_SPLIT: "test"}).to_csv(tmp_path / C.METADATA_CSV, index=False)
    scored = pd.DataFrame({C.COL_IMAGE_ID: ["C", "A", "B"], C.COL_SOURCE: ["ddi", "isic2020", "isic2020"],
                           C.COL_SKIN_TONE_NAME: ["dark", "light", "tan"]})
    groups = report_groups(with_record_metadata(scored, crops))
    assert {k: list(v) for k, v in groups.items()} == {
        "skin_tone": ["dark", "light", "tan"], "fitzpatrick": ["unknown", "unknown", "V-VI"],
        "sex": ["unknown", "male", "female"], "age_band": ["unknown", "75+", "<30"],
        "anatomic_site": ["palms/soles", "torso", "unknown"], "source": ["ddi", "isic2020", "isic2020"]}


def test_evaluate_predictions_takes_subgroups_from_the_truth_table(tmp_path):
    from kmel.config import load_config
    from kmel.evaluation.evaluate import evaluate_predictions

    scored = _scored_table(120, seed=4)
    pred = pd.DataFrame({"image": scored[C.COL_IMAGE_ID], "relpath": scored[C.COL_IMAGE_ID] + ".jpg",
                         "probability": scored["probability"], "threshold": 0.5, "status": "ok",
                         "skin_tone_group": scored[C.COL_SKIN_TONE_NAME]})
    pred.to_csv(tmp_path / "pred.csv", index=False)
    scored.rename(columns={C.COL_IMAGE_ID: "image"})[["image", C.COL_TARGET, C.COL_SEX, "fitzpatrick_group"]].to_csv(
        tmp_path / "truth.csv", index=False)
    report = evaluate_predictions(tmp_path / "pred.csv", tmp_path / "truth.csv", tmp_path / "rep",
                                  load_config("cpu-small", {"classifier.bootstrap": 20}))
    assert {"skin_tone", "sex", "fitzpatrick"} <= set(report["fairness"])
    assert report["fairness"]["sex"]["groups"]["male"]["n"] == int((scored[C.COL_SEX] == "male").sum())
    assert report["tone_agreement"]["skin_tone"]["n"] == int(scored["fitzpatrick_group"].notna().sum())


def test_report_says_where_the_threshold_was_chosen():
    """The 'How to read this' line is derived from the split the threshold came from and the split reported."""
    from kmel.evaluation.report import _threshold_note

    assert "not tuned" in _threshold_note({"threshold_split": "val", "split": "test"})
    assert "`val` split" in _threshold_note({"threshold_split": "val", "split": "test"})
    same = _threshold_note({"threshold_split": "val", "split": "val"})
    assert "same `val` split" in same and "optimistic" in same
    assert "not recorded" in _threshold_note({"split": "test"})
