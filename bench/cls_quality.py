"""Classifier quality on real data: a profile's classifier on crops made by the benchmark segmenter.

usage: python bench/cls_quality.py [--profile cpu-pretrained|cpu-small] [--epochs N] [--patience N]
                                   [--seg bench/out/seg] [--out bench/out/cls] [--fresh] [--task diagnosis]

Needs ``bench/seg_quality.py`` first: it reuses that run's records (the fixed 1,600 / 400 / 594 split
of ../shared/data/isic2018-task1-256, labels from the official ISIC 2019 ground truth) and its
exported segmenter. Crop records are built with that segmenter (the same code path as `train cls`)
at the profile's classifier size. ``cpu-small`` trains EfficientNet-B0 from scratch; ``cpu-pretrained``
fine-tunes EfficientNet-Lite0 from the ImageNet weights that kmel's install brings. The threshold is
chosen on val and the test split is reported: AUC, average precision, sensitivity / specificity at
the threshold, and the per-skin-tone table, with run times. Task: malignant (here MEL vs NV/BKL), or with
``--task diagnosis`` the profile's classes on records of the same images and split (built under OUT/records):
then also the balanced multiclass accuracy and per-class recall, overall and per source.

For scale it also prints a model-free floor: logistic regression on 30 colour statistics of the
same crops (Lab / HSV means, spreads and percentiles, whole crop and centre), fitted on train.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from _common import OUT, per_source


def colour_baseline(crops_dir: Path, config) -> dict[str, float]:
    """Test AUC of a logistic regression on colour statistics of the crops (fitted on train)."""
    import cv2
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kmel.data.datasets import make_dataset
    from kmel.data.records import load_manifest
    from kmel.models.heads import head_from_manifest

    head = head_from_manifest(load_manifest(crops_dir))  # a diagnosis run: malignant or not from the class

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows, targets = [], []
        for images, target in make_dataset(crops_dir, split, "crop", False, config, batch_size=64):
            for image in images.numpy().astype(np.uint8):
                lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float32)
                q = image.shape[0] // 4
                centre = lab[q:-q, q:-q].reshape(-1, 3)
                lab = lab.reshape(-1, 3)
                rows.append(np.concatenate([lab.mean(0), lab.std(0), np.percentile(lab, [5, 25, 50, 75, 95], 0).ravel(),
                                            hsv.std(0), centre.mean(0), centre.std(0)]))
            targets.extend(head.malignant_target(target.numpy()))
        return np.array(rows), np.array(targets)

    x_train, y_train = features("train")
    x_test, y_test = features("test")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    return {"test_auc": round(float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience (profile's by default)")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--seg", default=str(OUT / "seg"), help="output folder of bench/seg_quality.py")
    parser.add_argument("--out", default=str(OUT / "cls"))
    parser.add_argument("--fresh", action="store_true", help="retrain from scratch (crop records are reused)")
    parser.add_argument("--task", default=None, choices=["diagnosis"],
                        help="diagnosis: build the same benchmark's records (same split) labelled with the profile's "
                             "classes under OUT/records and train the softmax head on them (the segmenter is --seg's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                        help="any other config override, value read as YAML (e.g. classifier.source_balance=1); "
                             "repeatable")
    args = parser.parse_args()
    from kmel import constants as C
    from kmel.config import load_config
    from kmel.lesion.crops import ensure_crop_records
    from kmel.training.train import fit_classifier

    seg, out = Path(args.seg), Path(args.out)
    records, seg_models = seg / "records", seg / "models"
    if not (seg_models / C.SEGMENTER_DIR / "saved_model.pb").exists():
        raise SystemExit(f"no exported segmenter under {seg_models}: run bench/seg_quality.py first")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / C.SEGMENTER_DIR).exists():
        shutil.copytree(seg_models / C.SEGMENTER_DIR, models / C.SEGMENTER_DIR)
        shutil.copy(seg_models / C.PIPELINE_JSON, models / C.PIPELINE_JSON)
    import yaml

    config = load_config(args.profile, {"classifier.epochs": args.epochs,
                                        "classifier.early_stopping_patience": args.patience,
                                        **{key: yaml.safe_load(value)
                                           for key, _, value in (item.partition("=") for item in args.set)}})

    if args.task == "diagnosis":
        from dataclasses import replace

        from _common import build_benchmark_records

        config = replace(config, records=replace(config.records, task="diagnosis"))
        seg_manifest = json.loads((records / C.MANIFEST).read_text())
        data = "union" if any("ham10000" in by_source for by_source in seg_manifest["counts"].values()) else "isic"
        if not (out / "records" / C.MANIFEST).exists():
            build_benchmark_records(out, config, data)
        records = out / "records"
    start = time.perf_counter()
    crops = ensure_crop_records(records, models, config)
    cropped = time.perf_counter()
    entry = fit_classifier(records, models, config, out / "runs", verbose=2)
    done = time.perf_counter()

    baseline = colour_baseline(crops, config)
    report = json.loads((models / "report" / "report.json").read_text())
    diagnosis = {k: v for k, v in report.get("diagnosis", {}).items()
                 if k in ("balanced_accuracy", "argmax_balanced_accuracy", "accuracy", "top2_accuracy", "n")}
    summary = report["summary"]
    manifest = json.loads((crops / C.MANIFEST).read_text())
    result = {
        "profile": args.profile, "overrides": args.set, "backbone": config.classifier.backbone, "image_size": config.classifier.image_size,
        "epochs_run": entry["epochs_run"], "threshold": round(entry["threshold"], 4),
        "threshold_method": config.classifier.threshold_method,
        "crop_modes": manifest.get("crop_modes"),
        "test": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
        "test_by_source": per_source(pd.read_csv(models / "report" / "predictions.csv"), entry["threshold"]),
        "crop_seconds": round(cropped - start, 1), "train_seconds": round(done - cropped, 1),
        "colour_statistics_logistic_regression": baseline,
        **({"task": "diagnosis", "test_diagnosis": diagnosis} if diagnosis else {}),
    }
    print(json.dumps(result, indent=2))
    print((models / "report" / "report.md").read_text())
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
