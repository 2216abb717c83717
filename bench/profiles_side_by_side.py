"""Every classifier profile side by side (issue 30) on the same real split, at a size two CPU cores allow.

    python bench/profiles_side_by_side.py --seg bench/out/seg-union [--image-size 128 --steps 50 --epochs 3]

The union benchmark's records (ISIC 2018 Task 1 + HAM10000, the yes/no malignant task; bench/seg_quality.py
--data union) and its segmenter; each profile's *classifier recipe* (backbone, head, learning rate, loss and
class weighting, balancing, augmentation, batch) trains on the same crops, made once at ``--image-size`` for all
(the crop settings are cpu-10k's for every row, so the inputs are identical), for the same number of steps. What
is the same for every row, and what is not, is said in the output:

- start: ImageNet where the weights can be had offline here (EfficientNet-Lite0/1/2 ship with pip packages), else
  from scratch (``--weights none``; the ResNets' Keras files need a download) — then every layer trains from the
  first step, since a frozen random stage would hold no features;
- task: the profiles with a diagnosis head (isic2017-resnet, ham7-resnet152) train the yes/no head here, because
  the records are labelled malignant or not: the comparison is of the recipes on one question;
- size: ``--image-size`` px and ``--steps`` × ``--epochs`` steps of ``--batch-size``, where the profiles ask for 224
  px and tens of epochs: a from-scratch ResNet reaches little in minutes of CPU, which is the finding — these
  profiles need a GPU (bench/step_time.py: ResNet152 at 224 px, batch 8, 13.3 s a step on this machine).

Prints one row per profile (test AUC per source, sensitivity / specificity at the val-chosen threshold, the widest
skin-tone recall gap of the report, training seconds) and writes OUT/result.json (default
bench/out/side-by-side). The crop records are built under OUT/records (links to the benchmark's record shards),
never in the benchmark's own folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from _common import OUT, per_source

PROFILES = ("cpu-10k", "smartphone-resnet50", "isic2017-resnet", "ham7-resnet152")
OFFLINE_IMAGENET = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def linked_records(source: Path, dest: Path) -> Path:
    """``dest`` with links to ``source``'s record shards, manifest and metadata (crop records go to ``dest``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not (dest / path.name).exists():
            (dest / path.name).symlink_to(path.resolve())
    return dest


def models_with_segmenter(seg: Path, models: Path) -> Path:
    """``models`` holding a copy of the benchmark's segmenter (SavedModel, ``.keras`` file and its pipeline entry)
    and no classifier, made once."""
    from kmel import constants as C

    if not (models / C.SEGMENTER_DIR).exists():
        models.mkdir(parents=True, exist_ok=True)
        shutil.copytree(seg / "models" / C.SEGMENTER_DIR, models / C.SEGMENTER_DIR)
        if (seg / "models" / C.SEGMENTER_KERAS).is_file():
            shutil.copy2(seg / "models" / C.SEGMENTER_KERAS, models / C.SEGMENTER_KERAS)
        pipeline = json.loads((seg / "models" / C.PIPELINE_JSON).read_text())
        pipeline.pop("classifier", None)
        (models / C.PIPELINE_JSON).write_text(json.dumps(pipeline, indent=2))
    return models


def report_row(models: Path, threshold: float) -> dict:
    """The trained model's test figures from its report: AUC per source with sensitivity / specificity at
    ``threshold``, the overall AUC, and the widest skin-tone recall gap."""
    report = json.loads((models / "report" / "report.json").read_text())
    table = pd.read_csv(models / "report" / "predictions.csv")
    gap = next((g for g in report.get("gap_ranking", []) if g["grouping"] == "skin_tone" and g["metric"] == "recall"),
               {})
    return {"threshold": threshold, "test_by_source": per_source(table, threshold),
            "test_auc": report["summary"].get("auc"), "skin_tone_recall_gap": gap.get("max_minus_min"),
            "skin_tone_recall_gap_groups": [gap.get("lowest"), gap.get("highest")]}


def main() -> None:
    from kmel import constants as C
    from kmel.config import config_from_dict, load_config, to_plain
    from kmel.lesion.crops import ensure_crop_records
    from kmel.training.train import fit_classifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seg", type=Path, default=OUT / "seg-union")
    parser.add_argument("--out", type=Path, default=OUT / "side-by-side")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None, help="classifier seed (default: each profile's)")
    parser.add_argument("--enhance-segmenter-input", action="store_true",
                        help="crops.enhance_segmenter_input on (CLAHE + gamma on the segmenter's input, as before it "
                             "became off by default)")
    parser.add_argument("--download-weights", action="store_true",
                        help="keep each profile's ImageNet weights (downloaded and checked once; needs the internet) "
                             "instead of starting the ResNets from scratch")
    args = parser.parse_args()
    records = linked_records(args.seg / "records", args.out / "records")
    manifest = json.loads((records / C.MANIFEST).read_text())
    crops_settings = load_config("cpu-10k", {"crops.enhance_segmenter_input": args.enhance_segmenter_input}).crops
    result = {"command": "python bench/profiles_side_by_side.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "rows": {}}
    for profile in args.profiles.split(","):
        base = load_config(profile)
        offline = base.classifier.backbone in OFFLINE_IMAGENET or args.download_weights
        overrides = {"classifier.image_size": args.image_size, "classifier.steps_per_epoch": args.steps,
                     "classifier.epochs": args.epochs, "classifier.batch_size": args.batch_size,
                     "classifier.bootstrap": 200, "classifier.early_stopping_patience": args.epochs,
                     "classifier.seed": args.seed}
        if not offline:
            overrides.update({"classifier.weights": "none", "classifier.unfreeze": [[0, "all"]]})
        data = load_config(profile, overrides).to_dict()
        data["records"] = manifest["config"]["records"]  # the benchmark's records (yes/no task)
        data["crops"] = to_plain(crops_settings)
        config = config_from_dict(data)
        models = models_with_segmenter(args.seg, args.out / profile / "models")
        ensure_crop_records(records, models, config)
        start = time.perf_counter()
        entry = fit_classifier(records, models, config, args.out / profile / "runs", verbose=2, restart=True)
        seconds = time.perf_counter() - start
        row = {"backbone": config.classifier.backbone, "head": config.classifier.head,
               "start": "ImageNet" if offline else "from scratch", "image_size": args.image_size,
               "steps": args.steps * args.epochs, "batch_size": args.batch_size,
               **report_row(models, entry["threshold"]), "train_seconds": round(seconds, 1)}
        result["rows"][profile] = row
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        by = row["test_by_source"]
        print(f"{profile}: {row['backbone']} ({row['start']}), test AUC ISIC {by['isic2019']['auc']} / HAM10000 "
              f"{by['ham10000']['auc']}; sens / spec ISIC {by['isic2019'].get('sensitivity')} / "
              f"{by['isic2019'].get('specificity')}, HAM10000 {by['ham10000'].get('sensitivity')} / "
              f"{by['ham10000'].get('specificity')}; skin-tone recall gap {row['skin_tone_recall_gap']}; "
              f"{row['train_seconds']} s", flush=True)
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
