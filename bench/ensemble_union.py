"""What averaging classifiers buys on the union benchmark, read off runs that already exist.

``train cls --ensemble K`` averages the probabilities of K members trained alike (seeds seed .. seed + K − 1).
A real K = 2 run of the union benchmark costs two ~50–100-minute trainings on this 2-core machine; before
spending them, this bench averages the uncalibrated test probabilities of union classifiers that were already
trained on the same crops (bench/cls_quality.py's runs, each writing ``models/report/predictions.csv``): the same
thing the ensemble model computes, for members that differ by more than a seed. AUC does not depend on the
calibration that follows, so the test AUCs here are the ensemble's.

    python bench/ensemble_union.py --runs bench/out/cls-union-sb1 bench/out/cls-union [bench/out/cls-union-diag]

Prints AUC and pAUC (above 80 % sensitivity) per test source for each member and for the mean, with 95 %
intervals of (mean − first member) over paired resamples of test images (kmel.evaluation.fusion.compare_scores),
and writes ``bench/out/ensemble-union/result.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import OUT

SOURCES = {"isic2019": "ISIC 2018 Task 1 test (594)", "ham10000": "HAM10000 test (1,536)", None: "whole test split"}


def member_scores(run: Path):
    """image_id → uncalibrated malignant probability (a diagnosis head's: the sum of its malignant classes, as
    exported) and the rows' source and target."""
    import pandas as pd

    table = pd.read_csv(run / "models" / "report" / "predictions.csv")
    return table.set_index("image_id")[["source", "target", "probability_uncalibrated"]]


def main() -> None:
    import numpy as np

    from kmel.evaluation.fusion import compare_scores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True,
                        help="bench/out/<run> folders of classifiers trained on the same union crops")
    parser.add_argument("--out", type=Path, default=OUT / "ensemble-union")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two runs")
    tables = [member_scores(run) for run in args.runs]
    ids = sorted(set.intersection(*(set(t.index) for t in tables)))
    if any(len(t) != len(ids) for t in tables):
        raise SystemExit(f"the runs' test splits differ ({[len(t) for t in tables]} rows, {len(ids)} shared): "
                         "they were not trained on the same records")
    base = tables[0].loc[ids]
    for t in tables[1:]:
        if not (t.loc[ids, "target"].to_numpy() == base["target"].to_numpy()).all():
            raise SystemExit("the runs disagree on the test labels")
    scores = np.stack([t.loc[ids, "probability_uncalibrated"].to_numpy(float) for t in tables])
    mean = scores.mean(axis=0)
    result = {"command": "python bench/ensemble_union.py --runs " + " ".join(str(r) for r in args.runs),
              "members": [str(r) for r in args.runs], "by_source": {}}
    print(f"members: {', '.join(r.name for r in args.runs)}; mean of their uncalibrated probabilities")
    for source, label in SOURCES.items():
        rows = np.ones(len(ids), bool) if source is None else (base["source"] == source).to_numpy()
        y = base["target"].to_numpy()[rows]
        entry = {"n": int(rows.sum()), "n_malignant": int(y.sum()), "members": {}}
        for run, s in zip(args.runs, scores):
            c = compare_scores(y, s[rows], s[rows], n_boot=0)
            entry["members"][run.name] = {"auc": c["auc"]["image"], "pauc80": c["pauc80"]["image"]}
        c = compare_scores(y, scores[0][rows], mean[rows], n_boot=args.bootstrap)
        entry["ensemble"] = {"auc": c["auc"]["fused"], "pauc80": c["pauc80"]["fused"],
                             "auc_minus_first_ci95": c["auc"].get("difference_ci95"),
                             "pauc80_minus_first_ci95": c["pauc80"].get("difference_ci95")}
        result["by_source"][source or "all"] = entry
        members = ", ".join(f"{k} {v['auc']:.3f}" for k, v in entry["members"].items())
        lo, hi = entry["ensemble"]["auc_minus_first_ci95"] or (float("nan"),) * 2
        print(f"{label}: n {entry['n']} ({entry['n_malignant']} malignant); AUC {members}; mean "
              f"{entry['ensemble']['auc']:.3f} (mean − first [{lo:+.3f}, {hi:+.3f}]); pAUC80 mean "
              f"{entry['ensemble']['pauc80']:.3f} vs first {entry['members'][args.runs[0].name]['pauc80']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
