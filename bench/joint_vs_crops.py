"""Joint segmenter + classifier (``kmel train joint``) against crop-then-classify, same size and budget (issue 30).

    python bench/joint_vs_crops.py --seg bench/out/seg-union [--image-size 128 --steps 50 --epochs 3]

The union benchmark's records (ISIC 2018 Task 1 + HAM10000, yes/no malignant; bench/seg_quality.py --data union)
and its segmenter (``segmenter.keras``, the joint model's start). Each row trains cpu-10k's classifier recipe
(EfficientNet-Lite0 from ImageNet, its rates, focal loss, balancing, threshold rule) for ``--steps`` × ``--epochs``
steps of ``--batch-size`` at ``--image-size`` px — the budget of bench/profiles_side_by_side.py's cpu-10k row, the
crop-then-classify baseline (its figures are read from ``--crops-result`` when given) — as one joint model on the
whole image padded square (the seg records, so ``--image-size`` ≤ their 128 px):

- ``joint``: kmel's joint defaults (alpha 0.25, segmentation loss weight 0.1, the segmenter frozen for one epoch);
- ``joint-attention``: joint-resnet50's joint settings (alpha 0: the classifier sees only the masked image; no
  segmentation loss: the mask is free to become an attention map), on the same Lite0 classifier.

Prints per row: test AUC per source, sensitivity / specificity at the val-chosen threshold, the skin-tone recall gap,
the joint mask's thresholded Jaccard on the test images with expert masks (the starting segmenter's is
bench/seg_quality.py's), training seconds. Writes OUT/result.json (default bench/out/joint-vs-crops); record shards
are linked under OUT/records, nothing is written in the benchmark's own folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import OUT
from profiles_side_by_side import linked_records, models_with_segmenter, report_row

ROWS = {
    "joint": {},
    "joint-attention": {"joint.alpha": 0.0, "joint.mask_loss_weight": 0.0},
}


def main() -> None:
    from kmel import constants as C
    from kmel.config import config_from_dict, load_config
    from kmel.training.joint import fit_joint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seg", type=Path, default=OUT / "seg-union")
    parser.add_argument("--out", type=Path, default=OUT / "joint-vs-crops")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crops-result", type=Path, default=OUT / "side-by-side" / "result.json",
                        help="bench/profiles_side_by_side.py's result.json: its cpu-10k row is the baseline")
    args = parser.parse_args()
    records = linked_records(args.seg / "records", args.out / "records")
    manifest = json.loads((records / C.MANIFEST).read_text())
    result = {"command": "python bench/joint_vs_crops.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "rows": {}}
    if args.crops_result.is_file():
        baseline = json.loads(args.crops_result.read_text())["rows"].get("cpu-10k")
        if baseline:
            result["rows"]["crop-then-classify (cpu-10k)"] = {**baseline, "from": str(args.crops_result)}
    for name in args.rows.split(","):
        overrides = {"classifier.image_size": args.image_size, "classifier.steps_per_epoch": args.steps,
                     "classifier.epochs": args.epochs, "classifier.batch_size": args.batch_size,
                     "classifier.bootstrap": 200, "classifier.early_stopping_patience": args.epochs, **ROWS[name]}
        data = load_config("cpu-10k", overrides).to_dict()
        data["records"] = manifest["config"]["records"]  # the benchmark's records (yes/no task)
        config = config_from_dict(data)
        models = models_with_segmenter(args.seg, args.out / name / "models")
        start = time.perf_counter()
        entry = fit_joint(records, models, config, args.out / name / "runs", verbose=2)
        seconds = time.perf_counter() - start
        row = {"backbone": config.classifier.backbone, "start": "ImageNet + the union segmenter",
               "joint": entry["joint"], "image_size": args.image_size, "steps": args.steps * args.epochs,
               "batch_size": args.batch_size, **report_row(models, entry["threshold"]),
               "mask_metrics": entry["mask_metrics"], "train_seconds": round(seconds, 1)}
        result["rows"][name] = row
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        by = row["test_by_source"]
        print(f"{name}: test AUC ISIC {by['isic2019']['auc']} / HAM10000 {by['ham10000']['auc']}; sens / spec ISIC "
              f"{by['isic2019'].get('sensitivity')} / {by['isic2019'].get('specificity')}, HAM10000 "
              f"{by['ham10000'].get('sensitivity')} / {by['ham10000'].get('specificity')}; skin-tone recall gap "
              f"{row['skin_tone_recall_gap']}; mask on test {entry['mask_metrics'].get('test')}; {row['train_seconds']} s",
              flush=True)
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
