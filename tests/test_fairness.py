"""Threshold choice and fairness numbers against values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kmel.fairness import choose_threshold, fairness_report, summary_metrics


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


def test_report_files(tmp_path):
    from kmel.report import write_report

    rng = np.random.default_rng(0)
    y = (rng.uniform(size=200) < 0.3).astype(int)
    s = np.clip(y * 0.3 + rng.uniform(size=200) * 0.7, 0, 1)
    g = rng.choice(["very_light", "light", "dark"], size=200)
    rep = write_report(tmp_path, y, s, 0.5, {"skin_tone": g}, meta={"split": "test", "threshold_from": "val"},
                       n_bootstrap=50)
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    md = (tmp_path / "report.md").read_text()
    assert "| very_light |" in md and "threshold" in md.lower()
    for name in ("roc.png", "pr.png", "groups.png", "calibration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Degenerate input: one class only must not crash.
    write_report(tmp_path / "one", np.zeros(10), np.linspace(0, 1, 10), 0.5, {"skin_tone": ["a"] * 10}, n_bootstrap=10)
