"""An operating point that travels: one threshold for every source, or one per source (``predict --source``).

The union classifier scores the ISIC images lower than the HAM10000 ones (test AUC 0.83 vs 0.89), so one threshold
chosen on the mixed validation split gives the two test splits very different sensitivities (0.75 vs 0.91 for the
source-balanced model). ``train cls`` now also chooses a threshold per source on that source's validation images
(``threshold_by_source`` in pipeline.json, used by ``predict --source NAME``). This bench scores a trained union
classifier's val and test crops once (cached in OUT/scores.csv) and compares, per test source, the sensitivity and
specificity of: the shipped global threshold; per-source thresholds by the profile's own rule
(:func:`kmel.training.train.choose_source_thresholds`); per-source and global thresholds aimed at a target
sensitivity (``threshold_method: sensitivity``). The gap is the difference of the two sources' test sensitivities,
with a 95 % interval from 1,000 resamples of each source's test images.

    python bench/operating_point.py --cls bench/out/cls-union-sb1 --seg bench/out/seg-union

Writes OUT/result.json (default bench/out/operating-point).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from _common import OUT, crops_trained_on


def score(cls_dir: Path, seg_dir: Path, out: Path) -> pd.DataFrame:
    """Calibrated val and test probabilities of the run's classifier on the crops it trained on."""
    cache = out / "scores.csv"
    if cache.is_file():
        return pd.read_csv(cache)
    import keras

    from kmel import constants as C
    from kmel.config import load_config
    from kmel.evaluation.evaluate import predict_records
    from kmel.models.heads import head_from_entry
    from kmel.models.pipeline import apply_temperature, read_pipeline

    models = cls_dir / "models"
    entry = read_pipeline(models)["classifier"]
    config = load_config(str(models / "classifier_config.yaml"))
    crops = crops_trained_on(seg_dir / "records", entry["records_fingerprint"])
    model = keras.saving.load_model(models / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
    head = head_from_entry(entry)
    parts = []
    for split in ("val", "test"):
        table = predict_records(model, crops, split, config, 64, progress=True, head=head)
        table["probability"] = apply_temperature(table["probability"].to_numpy(), entry["temperature"])
        parts.append(table.assign(split=split))
    scores = pd.concat(parts, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(cache, index=False)
    return scores


def rates(table: pd.DataFrame, threshold: float) -> tuple[float, float]:
    y, p = table["target"].to_numpy(), table["probability"].to_numpy()
    return float((p[y == 1] >= threshold).mean()), float((p[y == 0] < threshold).mean())


def gap_interval(test: pd.DataFrame, thresholds: dict[str, float], n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95 % interval of sensitivity(first source) − sensitivity(second) over resamples of each source's malignant
    test images."""
    rng = np.random.default_rng(seed)
    sources = sorted(thresholds)
    hits = {s: (test.loc[(test["source"] == s) & (test["target"] == 1), "probability"].to_numpy() >= thresholds[s])
            for s in sources}
    draws = [hits[sources[0]][rng.integers(0, len(hits[sources[0]]), len(hits[sources[0]]))].mean()
             - hits[sources[1]][rng.integers(0, len(hits[sources[1]]), len(hits[sources[1]]))].mean()
             for _ in range(n_boot)]
    return [round(float(q), 4) for q in np.percentile(draws, [2.5, 97.5])]


def main() -> None:
    from kmel.config import load_config
    from kmel.models.pipeline import read_pipeline
    from kmel.training.train import (
        choose_classifier_threshold,
        choose_source_thresholds,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cls", type=Path, default=OUT / "cls-union-sb1", help="a bench/cls_quality.py run")
    parser.add_argument("--seg", type=Path, default=OUT / "seg-union", help="the segmenter run whose records it used")
    parser.add_argument("--out", type=Path, default=OUT / "operating-point")
    parser.add_argument("--targets", default="0.8,0.85,0.9", help="target sensitivities to try")
    args = parser.parse_args()
    scores = score(args.cls, args.seg, args.out)
    val, test = scores[scores["split"] == "val"], scores[scores["split"] == "test"]
    cc = load_config(str(args.cls / "models" / "classifier_config.yaml")).classifier
    entry = read_pipeline(args.cls / "models")["classifier"]
    sources = sorted(test["source"].unique())
    rules: dict[str, dict[str, float]] = {
        "global, shipped": dict.fromkeys(sources, float(entry["threshold"])),
        f"per source, the profile's rule ({cc.threshold_method})": {
            s: v["threshold"] for s, v in choose_source_thresholds(cc, val).items()},
    }
    for target in (float(t) for t in args.targets.split(",")):
        rule = replace(cc, threshold_method="sensitivity", target_sensitivity=target)
        rules[f"global, sensitivity {target:g} on mixed val"] = dict.fromkeys(
            sources, float(choose_classifier_threshold(rule, val)["threshold"]))
        rules[f"per source, sensitivity {target:g}"] = {
            s: v["threshold"] for s, v in choose_source_thresholds(rule, val).items()}
    result = {"command": f"python bench/operating_point.py --cls {args.cls} --seg {args.seg}",
              "n_val": {s: int((val["source"] == s).sum()) for s in sources},
              "n_test": {s: int((test["source"] == s).sum()) for s in sources}, "rules": {}}
    print(f"{'rule':48s} " + "  ".join(f"{s + ' thr / sens / spec':>30s}" for s in sources) + "  sens gap [95 % CI]")
    for name, thresholds in rules.items():
        row = {}
        for s in sources:
            sens, spec = rates(test[test["source"] == s], thresholds[s])
            row[s] = {"threshold": round(thresholds[s], 4), "sensitivity": round(sens, 4),
                      "specificity": round(spec, 4)}
        gap = row[sources[0]]["sensitivity"] - row[sources[1]]["sensitivity"]
        interval = gap_interval(test, thresholds)
        result["rules"][name] = {"test": row, "sensitivity_gap": round(gap, 4), "gap_ci95": interval}
        print(f"{name:48s} " + "  ".join(f"{v['threshold']:>12.3f} / {v['sensitivity']:.3f} / {v['specificity']:.3f}"
                                        for v in row.values())
              + f"  {gap:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
