"""The diagnosis task's part of the report: balanced multiclass accuracy (mean per-class recall, the ISIC 2018 /
2019 metric), accuracy and top-2 accuracy, per-class AUC (one class against the rest), sensitivity, specificity
and precision of the decided class (:meth:`kmel.models.heads.ClassifierHead.decide`, predict's ``diagnosis``),
and the confusion matrix as counts and row-normalised (Markdown and PNG); beside them the balanced accuracy of
the plain arg-max of the probabilities, so the decision rule's effect shows.

The malignant summary, per-group tables and calibration of the same report are the yes/no ones, on the malignant
probability (:mod:`kmel.evaluation.report`); this section is added beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from kmel.evaluation.fairness import _clean  # noqa: E402


def balanced_accuracy(true_class: Any, guess: Any) -> float | None:
    """Mean over the classes present in ``true_class`` of the share of their images ``guess`` names right."""
    y, guess = np.asarray(true_class).reshape(-1).astype(int), np.asarray(guess).reshape(-1).astype(int)
    recalls = [float((guess[y == c] == c).mean()) for c in np.unique(y)]
    return float(np.mean(recalls)) if recalls else None


def diagnosis_metrics(true_class: Any, probabilities: Any, classes: Sequence[str], decided: Any = None,
                      decision: str = "arg-max of p_c") -> dict[str, Any]:
    """Multiclass metrics of [N, K] ``probabilities`` and the classes ``decided`` (class indices; default: the
    arg-max of the probabilities) against class indices ``true_class``. ``decision`` says how they were decided.

    Recall, precision, the confusion matrix and the balanced accuracy are of the decided class; the AUCs and the
    top-2 accuracy rank the probabilities; ``argmax_balanced_accuracy`` is the plain arg-max's. Classes absent
    from the truths have no recall or AUC (None) and do not count in the balanced accuracy."""
    y = np.asarray(true_class).reshape(-1).astype(int)
    p = np.asarray(probabilities, dtype=np.float64).reshape(len(y), len(classes))
    guess = p.argmax(axis=1) if decided is None else np.asarray(decided).reshape(-1).astype(int)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, guess), 1)
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        pos, called = y == i, guess == i
        n = int(pos.sum())
        recall = float(called[pos].mean()) if n else None
        per_class[name] = {
            "n": n, "predicted": int(called.sum()), "sensitivity": recall,
            "specificity": float((~called[~pos]).mean()) if (~pos).any() else None,
            "precision": float(pos[called].mean()) if called.any() else None,
            "auc": float(skm.roc_auc_score(pos, p[:, i])) if 0 < n < len(y) else None,
        }
    top2 = np.argsort(-p, axis=1)[:, :2]
    return {
        "n": int(len(y)), "classes": list(classes), "decision": decision,
        "balanced_accuracy": balanced_accuracy(y, guess),
        "argmax_balanced_accuracy": balanced_accuracy(y, p.argmax(axis=1)),
        "accuracy": float((guess == y).mean()) if len(y) else None,
        "top2_accuracy": float((top2 == y[:, None]).any(axis=1).mean()) if len(y) else None,
        "classes_present": int(len(np.unique(y))),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def diagnosis_markdown(metrics: dict[str, Any]) -> str:
    """The report.md section: summary line, per-class table, confusion matrix (counts, then row-normalised)."""
    classes = metrics["classes"]
    confusion = np.asarray(metrics["confusion"], dtype=float)
    decision = metrics.get("decision", "arg-max of p_c")
    lines = ["", "## Diagnosis (decided class)", "",
             f"Decision: {decision}. Balanced multiclass accuracy (mean per-class recall over the "
             f"{metrics['classes_present']} classes present): **{_fmt(metrics['balanced_accuracy'])}** (plain "
             f"arg-max of p_c: {_fmt(metrics.get('argmax_balanced_accuracy'))}); accuracy "
             f"{_fmt(metrics['accuracy'])}; top-2 accuracy of the probabilities {_fmt(metrics['top2_accuracy'])}; "
             f"n = {metrics['n']}.", "",
             "| class | n | predicted | sensitivity | specificity | precision | AUC (one vs rest) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in classes:
        c = metrics["per_class"][name]
        lines.append(f"| {name} | {c['n']} | {c['predicted']} | {_fmt(c['sensitivity'])} | {_fmt(c['specificity'])} "
                     f"| {_fmt(c['precision'])} | {_fmt(c['auc'])} |")
    for title, table, cell in (("counts", confusion, lambda v: f"{int(v)}"),
                               ("row-normalised: share of each true class", _row_normalised(confusion),
                                lambda v: f"{v:.2f}")):
        lines += ["", f"Confusion matrix, {title} (rows: true class, columns: predicted):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for name, row in zip(classes, table):
            lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _row_normalised(confusion: np.ndarray) -> np.ndarray:
    rows = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)


def plot_confusion(path: Path, metrics: dict[str, Any]) -> Path:
    """confusion.png: counts (left) and row-normalised (right)."""
    classes = metrics["classes"]
    confusion = np.asarray(metrics["confusion"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(classes), 0.6 * len(classes) + 2.5))
    for ax, table, title, fmt in ((axes[0], confusion, "counts", "{:.0f}"),
                                  (axes[1], _row_normalised(confusion), "row-normalised (recall on the diagonal)",
                                   "{:.2f}")):
        ax.imshow(table if title != "counts" else _row_normalised(confusion), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(classes)), classes, rotation=45)
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_diagnosis_report(out_dir: str | Path, report: dict[str, Any], true_class: Any, probabilities: Any,
                         classes: Sequence[str], decided: Any = None,
                         decision: str = "arg-max of p_c") -> dict[str, Any]:
    """Add the diagnosis section to a written report (report.json's ``diagnosis``, report.md, confusion.png);
    ``decided`` and ``decision`` as for :func:`diagnosis_metrics`."""
    out_dir = Path(out_dir)
    metrics = _clean(diagnosis_metrics(true_class, probabilities, classes, decided, decision))
    plot_confusion(out_dir / "confusion.png", metrics)
    report = {**report, "diagnosis": metrics}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    with open(out_dir / "report.md", "a", encoding="utf-8") as md:
        md.write(diagnosis_markdown(metrics))
    return report
