"""Image-only vs fused, side by side: the report of an image + metadata fusion model on a labelled split.

The fused scores get kmel's whole report (metrics at the fusion's threshold, every per-group table with
bootstrap intervals, plots: :func:`kmel.evaluation.report.write_report`); beside it, the comparison with the
image model alone on the same rows: AUC and partial AUC above 80 % TPR of both with 95 % intervals from the
same resamples, so the interval of their difference is paired; the same two figures per group of every grouping;
each score's metrics at its own threshold; and the trees' feature importance (share of split gain).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kmel.evaluation.fairness import _auc, _clean, partial_auc, summary_metrics
from kmel.evaluation.report import write_report

METRICS = {"auc": _auc, "pauc80": partial_auc}
MIN_GROUP_POSITIVES = 2  # a group's AUC needs both classes; fewer malignant lesions than this: not compared


def compare_scores(y: Any, image: Any, fused: Any, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC and pAUC of the image and the fused scores with 95 % percentile intervals, and of their difference
    (fused − image) over the same resamples of rows."""
    y = np.asarray(y).astype(int).reshape(-1)
    image = np.asarray(image, dtype=np.float64).reshape(-1)
    fused = np.asarray(fused, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    draws = [d for d in (rng.integers(0, len(y), len(y)) for _ in range(max(n_boot, 0)))
             if 0 < y[d].sum() < len(d)]
    out: dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum()), "resamples": len(draws)}
    for name, fn in METRICS.items():
        a, b = fn(y, image), fn(y, fused)
        entry = {"image": a, "fused": b, "difference": b - a}
        if draws:
            samples = np.array([[fn(y[d], image[d]), fn(y[d], fused[d])] for d in draws])
            for key, values in (("image", samples[:, 0]), ("fused", samples[:, 1]),
                                ("difference", samples[:, 1] - samples[:, 0])):
                entry[f"{key}_ci95"] = [float(q) for q in np.percentile(values, [2.5, 97.5])]
        out[name] = entry
    return _clean(out)


def compare_by_group(y: Any, image: Any, fused: Any, groups: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per grouping, one row per group: its size, malignant count, and both scores' AUC and pAUC (None where the
    group has fewer than :data:`MIN_GROUP_POSITIVES` malignant or no benign lesions)."""
    y = np.asarray(y).astype(int).reshape(-1)
    image = np.asarray(image, dtype=np.float64).reshape(-1)
    fused = np.asarray(fused, dtype=np.float64).reshape(-1)
    out: dict[str, list[dict[str, Any]]] = {}
    for grouping, values in groups.items():
        values = np.asarray(values).astype(str).reshape(-1)
        rows = []
        for name in sorted(np.unique(values)):
            sel = values == name
            positives = int(y[sel].sum())
            row: dict[str, Any] = {"group": name, "n": int(sel.sum()), "n_positive": positives}
            scored = positives >= MIN_GROUP_POSITIVES and positives < sel.sum()
            for metric, fn in METRICS.items():
                a = fn(y[sel], image[sel]) if scored else None
                b = fn(y[sel], fused[sel]) if scored else None
                row.update({f"image_{metric}": a, f"fused_{metric}": b,
                            f"difference_{metric}": None if a is None else b - a})
            rows.append(row)
        out[grouping] = rows
    return _clean(out)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(entry: Mapping[str, Any], key: str) -> str:
    ci = entry.get(f"{key}_ci95")
    return f"{_fmt(entry[key])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(entry[key])


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The side-by-side section of the fusion report, as Markdown."""
    overall = comparison["overall"]
    lines = ["", "## Image only vs fused (image + metadata)", "",
             f"{overall['n']} lesions, {overall['n_positive']} malignant; intervals: 95 % over "
             f"{overall['resamples']} resamples of the rows (the same for both scores).", "",
             "| metric | image only | fused | fused − image |", "|---|---|---|---|"]
    for metric in METRICS:
        e = overall[metric]
        lines.append(f"| {metric} | {_ci(e, 'image')} | {_ci(e, 'fused')} | {_ci(e, 'difference')} |")
    lines += ["", "At each score's own threshold:", "", "| score | threshold | sensitivity | specificity | f1 |",
              "|---|---|---|---|---|"]
    for name in ("image", "fused"):
        m = comparison["at_threshold"][name]
        lines.append(f"| {name} | {_fmt(m['threshold'])} | {_fmt(m.get('sensitivity'))} | "
                     f"{_fmt(m.get('specificity'))} | {_fmt(m.get('f1'))} |")
    for grouping, rows in comparison["by_group"].items():
        lines += ["", f"### By {grouping}", "", "| group | n | malignant | AUC image | AUC fused | pAUC image | "
                  "pAUC fused |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['n']} | {r['n_positive']} | {_fmt(r['image_auc'])} | {_fmt(r['fused_auc'])} | "
                  f"{_fmt(r['image_pauc80'])} | {_fmt(r['fused_pauc80'])} |" for r in rows]
    importance = comparison.get("importance_gain") or {}
    if importance:
        lines += ["", "## Feature importance (share of the trees' split gain)", "", "| feature | gain share |",
                  "|---|---|"]
        lines += [f"| {name} | {share:.3f} |" for name, share in importance.items() if share > 0]
    return "\n".join(lines) + "\n"


def write_fusion_report(
    out_dir: str | Path, y: Any, image: Any, fused: Any, image_threshold: float, fused_threshold: float,
    groups: Mapping[str, Any], importance: Mapping[str, float], meta: Mapping[str, Any] | None = None,
    n_bootstrap: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Write the fused scores' report (report.json, report.md, plots) with the image-only comparison in it.

    ``image`` and ``fused`` are calibrated probabilities of the same rows; each threshold applies to its own.
    Returns the report; its ``image_vs_fused`` section holds :func:`compare_scores`, :func:`compare_by_group`,
    both scores' metrics at their thresholds and the importance.
    """
    out_dir = Path(out_dir)
    y = np.asarray(y).astype(int).reshape(-1)
    report = write_report(out_dir, y, fused, fused_threshold, groups, meta=meta, n_bootstrap=n_bootstrap, seed=seed,
                          title="kmel fusion report (image + metadata)")
    comparison = _clean({
        "overall": compare_scores(y, image, fused, n_bootstrap, seed),
        "by_group": compare_by_group(y, image, fused, groups),
        "at_threshold": {"image": summary_metrics(y, image, image_threshold),
                         "fused": summary_metrics(y, fused, fused_threshold)},
        "importance_gain": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
    })
    report["image_vs_fused"] = comparison
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    with open(out_dir / "report.md", "a", encoding="utf-8") as handle:
        handle.write(comparison_markdown(comparison))
    return report
