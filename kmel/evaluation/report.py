"""Report files: report.json, report.md and PNG plots (ROC, PR, per-group bars, calibration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from kmel.constants import ITA_CATEGORIES, SKIN_TONE_GROUPS  # noqa: E402
from kmel.evaluation.calibration import calibration_report
from kmel.evaluation.fairness import (
    MIN_GROUP_SIZE,
    _clean,
    fairness_report,
    rank_gaps,
    summary_metrics,
    tone_agreement,
)

# Groupings with an estimated tone, compared with the annotated Fitzpatrick band where both exist.
ESTIMATED_SCALES = {"skin_tone": SKIN_TONE_GROUPS, "ita_category": ITA_CATEGORIES}
ANNOTATED = "fitzpatrick"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(row: Mapping[str, Any], metric: str) -> str:
    ci = (row.get("ci95") or {}).get(metric)
    return f"{_fmt(row.get(metric))} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]" if ci else _fmt(row.get(metric))


def _threshold_note(meta: Mapping[str, Any]) -> str:
    """Where the threshold came from, compared with the split reported (from the report's own metadata)."""
    chosen_on, split = meta.get("threshold_split"), meta.get("split")
    if chosen_on is None:
        return "- Where the threshold was chosen is not recorded: the numbers above may be tuned on this split."
    if chosen_on == split:
        return (f"- The threshold was chosen on this same `{split}` split: the numbers above are tuned on the data "
                "they describe and are optimistic.")
    return (f"- The threshold was chosen on the `{chosen_on}` split; the numbers above are for the `{split}` split, "
            "so they are not tuned on the data they describe.")


def _markdown(report: Mapping[str, Any], title: str) -> str:
    s, meta = report["summary"], report["meta"]
    lines = [f"# {title}", ""]
    lines.append(f"Split: **{meta.get('split', '?')}**, n = {s['n']} ({s['n_positive']} positive). "
                 f"Threshold {s['threshold']:.4f} (chosen on: {meta.get('threshold_from', 'unknown')}).")
    lines += ["", "| metric | value |", "|---|---|"]
    for key in ("auc", "pauc80", "average_precision", "accuracy", "sensitivity", "specificity", "precision", "f1",
                "balanced_accuracy", "brier"):
        name = "pAUC above 80 % TPR (ISIC 2024 metric, 0–0.2)" if key == "pauc80" else key
        lines.append(f"| {name} | {_fmt(s.get(key))} |")
    lines.append(f"| confusion (tp/fp/fn/tn) | {s['tp']}/{s['fp']}/{s['fn']}/{s['tn']} |")
    for grouping, data in report["fairness"].items():
        if grouping == "overall":
            continue
        lines += ["", f"## By {grouping.replace('_', ' ')}", "",
                  "| group | n | positives | accuracy [95% CI] | recall [95% CI] | precision [95% CI] | F1 | "
                  "AUC [95% CI] | pAUC>80%TPR [95% CI] | selection rate |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in data["groups"].items():
            small = " \\*" if row.get("small") else ""
            lines.append(f"| {name}{small} | {row['n']} | {row['n_positive']} | {_ci(row, 'accuracy')} | "
                         f"{_ci(row, 'recall')} | {_ci(row, 'precision')} | {_fmt(row['f1'])} | "
                         f"{_ci(row, 'auc')} | {_ci(row, 'pauc80')} | {_fmt(row['selection_rate'])} |")
        lines += ["", "Max–min gaps: " + ", ".join(_gap(k, v) for k, v in data["gaps"].items()) + ".",
                  f"Equalized-odds difference {_fmt(data['equalized_odds_difference'])}, "
                  f"demographic-parity difference {_fmt(data['demographic_parity_difference'])}."]
        if any(row.get("small") for row in data["groups"].values()):
            lines.append(f"\\* fewer than {data['min_group_size']} images: in the gaps above, "
                         "not in the ranking below.")
    ranking = report.get("gap_ranking") or []
    if ranking:
        lines += ["", "## Largest gaps", "", "Groups of at least "
                  f"{meta.get('min_group_size', MIN_GROUP_SIZE)} images only; `unknown` never counts.", "",
                  "| grouping | metric | gap [95% CI] | lowest | highest |", "|---|---|---|---|---|"]
        for row in ranking[:10]:
            lines.append(f"| {row['grouping']} | {row['metric']} | {_gap_ci(row)} | {row['lowest']} | "
                         f"{row['highest']} |")
    calibration = report.get("calibration")
    if calibration:
        o = calibration["overall"]
        lines += ["", "## Calibration", "",
                  f"Temperature {_fmt(calibration['temperature'])} (fitted on the validation split; 1 = none). "
                  f"Expected calibration error ({calibration['n_bins']} bins): {_fmt(o['ece_before'])} before, "
                  f"{_fmt(o['ece_after'])} after.", "", "| grouping | group | n | ECE before | ECE after |",
                  "|---|---|---|---|---|"]
        for grouping, rows in calibration.items():
            if isinstance(rows, dict) and grouping != "overall":
                for name, row in rows.items():
                    lines.append(f"| {grouping} | {name} | {row['n']} | {_fmt(row['ece_before'])} | "
                                 f"{_fmt(row['ece_after'])} |")
    for estimate, agreement in (report.get("tone_agreement") or {}).items():
        if not agreement:
            continue
        scale = list(next(iter(agreement["confusion"].values())))
        lines += ["", f"## Estimated {estimate.replace('_', ' ')} vs annotated Fitzpatrick type", "",
                  f"{agreement['n']} images with both; Spearman ρ {_fmt(agreement['spearman_rho'])}.", "",
                  "| Fitzpatrick | " + " | ".join(scale) + " |", "|---|" + "---|" * len(scale)]
        for band, counts in agreement["confusion"].items():
            lines.append(f"| {band} | " + " | ".join(str(counts[n]) for n in scale) + " |")
    lines += ["", "## How to read this", "", _threshold_note(meta),
              "- Skin-tone groups are estimated from the photograph (brightness of the skin around the lesion, "
              "and the ITA angle); they are a heuristic, not Fitzpatrick types.",
              "- Intervals are 95% percentile bootstraps within each group. A small group, or one with few "
              "positives, has wide intervals: a gap smaller than the intervals is not evidence of a difference.",
              "- `–` marks a metric that is undefined for a group (for example recall with no positives, AUC with "
              "one class).",
              "- `fitzpatrick` groups are annotated Fitzpatrick types (Fitzpatrick17k, ISIC Archive, DDI) in three "
              "bands; images without an annotation are `unknown`. The agreement tables show how far the estimated "
              "tone is from them.",
              "- Calibration: a probability of 0.3 should be malignant about 30% of the time; the ECE is the average "
              "distance from that, and the threshold is on the calibrated scale."]
    return "\n".join(lines) + "\n"


def _gap(metric: str, gap: Mapping[str, Any]) -> str:
    return f"{metric} {_gap_ci(gap)}"


def _gap_ci(gap: Mapping[str, Any]) -> str:
    ci = gap.get("ci95")
    return f"{_fmt(gap['max_minus_min'])} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]" if ci else _fmt(gap["max_minus_min"])


def _plots(out_dir: Path, y: np.ndarray, s: np.ndarray, threshold: float, groups: Mapping[str, np.ndarray],
           fairness: Mapping[str, Any]) -> list[str]:
    notes = []
    first = next(iter(groups), None)
    two = len(np.unique(y)) == 2
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        if two:
            curves = [("all", np.ones_like(y, bool))]
            if first is not None:
                curves += [(str(n), groups[first] == n) for n in np.unique(groups[first])]
            for name, sel in curves:
                if len(np.unique(y[sel])) < 2:
                    continue
                if kind == "roc":
                    fpr, tpr, _ = skm.roc_curve(y[sel], s[sel])
                    ax.plot(fpr, tpr, lw=2.5 if name == "all" else 1.2,
                            label=f"{name} (AUC {skm.roc_auc_score(y[sel], s[sel]):.2f}, n={sel.sum()})")
                else:
                    prec, rec, _ = skm.precision_recall_curve(y[sel], s[sel])
                    ax.plot(rec, prec, lw=2.5 if name == "all" else 1.2, label=f"{name} (n={sel.sum()})")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], ls=":", c="grey")
                ax.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)", title="ROC")
            else:
                ax.set(xlabel="recall", ylabel="precision", title="Precision–recall")
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        else:
            ax.text(0.5, 0.5, "one class only: curve undefined", ha="center")
            notes.append(f"{kind}: one class only")
        fig.tight_layout()
        fig.savefig(out_dir / f"{kind}.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    if first is not None:
        rows = fairness[first]["groups"]
        names = list(rows)
        width = 0.27
        for i, metric in enumerate(("recall", "precision", "accuracy")):
            vals = np.array([rows[n][metric] if rows[n][metric] is not None else np.nan for n in names], float)
            lo_hi = [(rows[n].get("ci95") or {}).get(metric) for n in names]
            err = np.array([[v - ci[0], ci[1] - v] if ci and not np.isnan(v) else [0, 0]
                            for v, ci in zip(vals, lo_hi)]).T
            ax.bar(np.arange(len(names)) + (i - 1) * width, np.nan_to_num(vals), width, yerr=np.maximum(err, 0),
                   capsize=2, label=metric)
        ax.set_xticks(np.arange(len(names)), [f"{n}\n(n={rows[n]['n']}, +{rows[n]['n_positive']})" for n in names],
                      fontsize=7)
        ax.set(ylim=(0, 1.05), title=f"By {first.replace('_', ' ')} at threshold {threshold:.3f} (95% CI)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "groups.png", dpi=110)
    plt.close(fig)

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(s, bins) - 1, 0, 9)
    mean_p = [s[which == b].mean() if (which == b).any() else np.nan for b in range(10)]
    frac = [y[which == b].mean() if (which == b).any() else np.nan for b in range(10)]
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.plot(mean_p, frac, marker="o")
    ax.set(ylabel="observed positive fraction", title="Calibration (10 bins)")
    hist.hist(s, bins=bins, color="grey")
    hist.set(xlabel="predicted probability", ylabel="count")
    fig.tight_layout()
    fig.savefig(out_dir / "calibration.png", dpi=110)
    plt.close(fig)
    return notes


def write_report(
    out_dir: str | Path, y_true: Any, scores: Any, threshold: float, groups: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None, n_bootstrap: int = 1000, seed: int = 0, title: str = "kmel report",
    raw_scores: Any = None, temperature: float = 1.0, min_group_size: int = MIN_GROUP_SIZE,
) -> dict[str, Any]:
    """Write report.json, report.md, roc.png, pr.png, groups.png, calibration.png; return the report.

    ``scores`` are the calibrated probabilities the threshold applies to; ``raw_scores`` the model's own
    (before ``temperature``), for the calibration section. A ``fitzpatrick`` grouping (annotated bands)
    is also compared with the estimated ``skin_tone`` / ``ita_category`` groupings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    groups = {k: np.asarray(v).astype(str).reshape(-1) for k, v in groups.items()}
    fairness = fairness_report(y, s, threshold, groups, n_bootstrap, seed, min_group_size)
    raw = s if raw_scores is None else np.asarray(raw_scores, dtype=np.float64).reshape(-1)
    report = {"meta": {**dict(meta or {}), "min_group_size": min_group_size},
              "summary": summary_metrics(y, s, threshold), "fairness": fairness, "gap_ranking": rank_gaps(fairness),
              "calibration": calibration_report(y, raw, s, groups, temperature)}
    if ANNOTATED in groups:
        report["tone_agreement"] = {name: tone_agreement(groups[ANNOTATED], groups[name], scale)
                                    for name, scale in ESTIMATED_SCALES.items() if name in groups}
    report["meta"]["plot_notes"] = _plots(out_dir, y, s, threshold, groups, fairness)
    report = _clean(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out_dir / "report.md").write_text(_markdown(report, title))
    return report
