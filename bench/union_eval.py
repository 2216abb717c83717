"""The union benchmark, read closely: segmenter per test split with a contact sheet of its worst images, and
the classifier per test split under several ways of choosing the decision threshold, with and without
test-time flips (AUC, and sensitivity / specificity at the shipped threshold), and per skin-tone group
with bootstrap intervals.

usage: python bench/union_eval.py [--seg bench/out/seg-union] [--cls bench/out/cls-union] [--out bench/out/union-eval]

Needs the outputs of ``bench/seg_quality.py --data union`` (records + segmenter) and ``bench/cls_quality.py``
on them (crop records + classifier). Nothing is trained here; everything is scored from the exported models.

Threshold choices compared (each chosen on val, reported on both test splits, ISIC 2018 Task 1 and HAM10000):
- ``shipped``: the one ``train cls`` chose (the profile's method on the mixed val split, skin-tone floor);
- ``isic_val_only``: the same method on the ISIC part of val only (a threshold from one clinic's data);
- ``source_floor``: F1-best among thresholds where every source in val keeps recall >= the profile's
  ``min_group_recall`` (``classifier.threshold_groups: [source]``);
- ``source_tone_floor``: the same over every (source, skin tone) group with a malignant image
  (``threshold_groups: [skin_tone, source]``);
- ``mixed_val_f1_no_floor``: plain F1-best on the mixed val split, no group floor.
Test AUC does not depend on the threshold; sensitivity and specificity do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import OUT, per_source


def seg_by_image(records: Path, models: Path, config, split: str = "test"):
    """Per-image Jaccard and Dice of the exported segmenter on ``split``; with images and masks for a sheet."""
    import numpy as np

    from kmel import constants as C
    from kmel.data.datasets import decode_image, decode_mask, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths
    from kmel.models.pipeline import load_serving, signature_fn

    segment = signature_fn(load_serving(models / C.SEGMENTER_DIR))
    size = config.segmenter.image_size
    files = shard_paths(records, "seg", split, load_manifest(records))
    ds = make_record_dataset(files, False, 0).map(
        lambda r: (decode_image(r, size), decode_mask(r, size), r[C.F_SOURCE], r[C.F_IMAGE_ID])).batch(64)
    rows, keep = [], {}
    for images, masks, sources, ids in ds:
        prob = segment(images.numpy())
        pred = prob.reshape(prob.shape[0], size, size) >= 0.5
        truth = masks.numpy()[..., 0] > 0.5
        inter = (pred & truth).sum((1, 2))
        union = (pred | truth).sum((1, 2))
        total = pred.sum((1, 2)) + truth.sum((1, 2))
        jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
        for k in range(len(jac)):
            image_id = ids[k].numpy().decode()
            rows.append({"image_id": image_id, "source": sources[k].numpy().decode(), "jaccard": float(jac[k]),
                         "dice": float(dice[k])})
            keep[image_id] = (images[k].numpy().astype(np.uint8), truth[k], prob.reshape(-1, size, size)[k])
    return rows, keep


def contact_sheet(rows, keep, path: Path, n: int = 16) -> list[dict]:
    """The ``n`` test images with the lowest Jaccard: image | expert mask | predicted probability, 4 per row."""
    import cv2
    import numpy as np

    worst = sorted(rows, key=lambda r: r["jaccard"])[:n]
    tiles = []
    for r in worst:
        image, truth, prob = keep[r["image_id"]]
        t = np.repeat((truth * 255).astype(np.uint8)[..., None], 3, -1)
        p = np.repeat((np.clip(prob, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
        tile = np.concatenate([image, t, p], 1)
        cv2.putText(tile, f"{r['image_id']} {r['source'][:4]} J={r['jaccard']:.2f}", (3, 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.concatenate([np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles), 4)], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return worst


def seg_summary(rows) -> dict:
    import numpy as np

    out = {}
    for source in sorted({r["source"] for r in rows}):
        jac = np.array([r["jaccard"] for r in rows if r["source"] == source])
        dice = np.array([r["dice"] for r in rows if r["source"] == source])
        out[source] = {"n": int(jac.size), "mean_jaccard": round(float(jac.mean()), 4),
                       "thresholded_jaccard": round(float(np.where(jac >= 0.65, jac, 0).mean()), 4),
                       "dice": round(float(dice.mean()), 4)}
    return out


def score_split(models: Path, crops: Path, split: str, config, tta: bool):
    """One row per crop of ``split``: source, target, skin tone and the calibrated probability (a diagnosis model's
    calibrated classes and the class it names too)."""

    from kmel import constants as C
    from kmel.evaluation.evaluate import predict_records
    from kmel.models.heads import head_from_entry
    from kmel.models.pipeline import (
        calibrate_outputs,
        load_serving,
        read_pipeline,
        signature_fn,
    )
    from kmel.serving.predictor import flip_averaged

    serve = signature_fn(load_serving(models / C.CLASSIFIER_DIR))
    score = flip_averaged(serve) if tta else serve
    entry = read_pipeline(models)["classifier"]
    head = head_from_entry(entry)
    table = predict_records(score, crops, split, config, batch_size=64, head=head)
    outputs = table[head.class_columns].to_numpy() if head.multiclass else table["probability"].to_numpy()
    classes, table["probability"] = calibrate_outputs(head, outputs, float(entry.get("temperature", 1.0)))
    if classes is not None:
        table[head.class_columns] = classes
        table["diagnosis"] = [head.classes[i] for i in head.decide(classes)]
    return table


def thresholds(val, config, shipped: float) -> dict[str, float]:
    """Each threshold rule of the comparison, chosen on the scored val table by ``train cls``'s own rule
    (:func:`kmel.training.train.choose_classifier_threshold`) with other groups or other rows."""
    from dataclasses import replace

    from kmel.training.train import choose_classifier_threshold

    cc = config.classifier

    def choose(part, groups, method=cc.threshold_method):
        return float(choose_classifier_threshold(replace(cc, threshold_groups=groups, threshold_method=method),
                                                 part)["threshold"])

    return {
        "shipped": shipped,
        "isic_val_only": choose(val[val["source"] != "ham10000"], ("skin_tone",)),
        "source_floor": choose(val, ("source",)),
        "source_tone_floor": choose(val, ("skin_tone", "source")),
        "mixed_val_f1_no_floor": choose(val, ("skin_tone",), "f1"),
    }


def tone_table(test, threshold: float, n_bootstrap: int) -> dict:
    """Per source, per estimated skin-tone group: size, positives, AUC and recall with 95 % bootstrap intervals."""
    from kmel.evaluation.fairness import fairness_report

    out = {}
    for source, part in test.groupby("source"):
        report = fairness_report(part["target"].to_numpy(), part["probability"].to_numpy(), threshold,
                                 {"skin_tone": part["skin_tone_name"].to_numpy()}, n_bootstrap=n_bootstrap)
        out[source] = {name: {"n": g["n"], "malignant": g["n_positive"], "auc": g.get("auc"),
                              "recall": g.get("recall"), "recall_ci95": (g.get("ci95") or {}).get("recall"),
                              "auc_ci95": (g.get("ci95") or {}).get("auc")}
                       for name, g in report["skin_tone"]["groups"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg", default=str(OUT / "seg-union"))
    parser.add_argument("--cls", default=str(OUT / "cls-union"))
    parser.add_argument("--out", default=str(OUT / "union-eval"))
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--seg-only", action="store_true", help="only the segmenter part (no classifier needed)")
    args = parser.parse_args()
    from kmel.config import config_from_dict
    from kmel.models.pipeline import read_pipeline
    from kmel.serving.runtime import config_from_pipeline

    seg, cls, out = Path(args.seg), Path(args.cls), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = seg / "records"
    seg_pipeline = read_pipeline(seg / "models")["segmenter"]
    seg_config = config_from_dict({"records": seg_pipeline["records"], "crops": seg_pipeline["crops"],
                                   "segmenter": seg_pipeline["config"]})
    rows, keep = seg_by_image(records, seg / "models", seg_config)
    worst = contact_sheet(rows, keep, out / "seg_worst16.png")
    result = {"segmenter_test": seg_summary(rows), "segmenter_worst16": worst}
    if args.seg_only:
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["segmenter_test"], indent=2))
        return
    models = cls / "models"
    pipeline = read_pipeline(models)
    config = config_from_pipeline(pipeline, models)
    crops = records / pipeline["classifier"]["crops_dir"]

    shipped = float(pipeline["classifier"]["threshold"])
    val = score_split(models, crops, "val", config, tta=False)
    test = score_split(models, crops, "test", config, tta=False)
    chosen = thresholds(val, config, shipped)
    result["thresholds"] = {name: {"threshold": round(t, 4), "test": per_source(test, t)} for name, t in chosen.items()}
    result["skin_tone_test"] = tone_table(test, shipped, args.bootstrap)
    test.to_csv(out / "test_scores.csv", index=False)
    # Test-time flips: AUC (threshold-free) and sensitivity / specificity at the shipped threshold.
    result["tta_flips_test"] = per_source(score_split(models, crops, "test", config, tta=True), shipped)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "segmenter_worst16"}, indent=2))
    print(f"contact sheet: {out / 'seg_worst16.png'}")


if __name__ == "__main__":
    main()
