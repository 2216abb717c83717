"""Segmenter quality on real data: train a profile's segmenter (cpu-small: the EfficientNet-Lite0-encoder
U-Net from ImageNet weights; `--backbone resnet18 --weights none` for the from-scratch ResNet18) on the
1,600 train images of ../shared/data/isic2018-task1-256, report val and test mean Jaccard and
thresholded Jaccard.

usage: python bench/seg_quality.py [--epochs N] [--profile cpu-small] [--out bench/out/seg]
       [--backbone efficientnet_lite0] [--weights imagenet] [--image-size 128]
       [--set segmenter.unfreeze='[[0, "4"], [2, "all"]]' ...]
(the overrides go over the profile's segmenter settings; --image-size also sets the records' seg_size)
The fixed train/val/test partition of labels.csv is used (not kmel's own split), so numbers are
comparable across runs and with the model-free Otsu mask of kmel.lesion.lesion (measured on the same
594 test images: mean Jaccard 0.635, thresholded Jaccard 0.463).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from _common import OUT, build_benchmark_records


def per_source_metrics(records: Path, models: Path, config, split: str = "test") -> dict[str, dict[str, float]]:
    """Mean Jaccard, thresholded Jaccard and Dice of the exported segmenter on ``split``, per record source."""
    import keras
    import tensorflow as tf

    from kmel import constants as C
    from kmel.data.datasets import _parse_eval_data, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths
    from kmel.training.losses import DiceCoefficient, IoUScore, ThresholdedJaccard

    model = keras.saving.load_model(models / C.SEGMENTER_KERAS, safe_mode=True, compile=False)
    manifest = load_manifest(records)
    files = shard_paths(records, "seg", split, manifest)
    sources = sorted(manifest["counts"].get(split, {}))
    out = {}
    for source in sources:
        ds = make_record_dataset(files, False, 0).filter(lambda r, s=source: tf.equal(r[C.F_SOURCE], s))
        ds = ds.map(lambda r: _parse_eval_data(r, "seg", config.segmenter.image_size)).batch(32)
        metrics = {"iou": IoUScore(), "thresholded_jaccard": ThresholdedJaccard(), "dice": DiceCoefficient()}
        n = 0
        for images, masks in ds:
            pred = model(images, training=False)
            for m in metrics.values():
                m.update_state(masks, pred)
            n += int(images.shape[0])
        if n:
            out[source] = {"images": n, **{k: round(float(m.result()), 4) for k, m in metrics.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--out", default=str(OUT / "seg"))
    parser.add_argument("--fresh", action="store_true", help="rebuild records and retrain from scratch")
    parser.add_argument("--data", choices=("isic", "union"), default="isic",
                        help="isic: the 2,594 ISIC 2018 Task 1 images; union: those plus all 10,015 HAM10000 "
                             "images and masks (HAM split 70/15/15 by lesion; the ISIC split stays fixed)")
    parser.add_argument("--backbone", default=None, help="segmenter backbone (default: the profile's)")
    parser.add_argument("--weights", default=None, help="imagenet | none | PATH (default: the profile's)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="segmenter input side; the seg records are written at this size too")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                        help="any other config override, value read as YAML; repeatable")
    args = parser.parse_args()
    from kmel.config import load_config
    from kmel.training.train import fit_segmenter

    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    config = load_config(args.profile, {
        "segmenter.epochs": args.epochs, "segmenter.backbone": args.backbone, "segmenter.weights": args.weights,
        "segmenter.image_size": args.image_size, "records.seg_size": args.image_size,
        **{key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)},
    })
    start = time.perf_counter()
    records = out / "records"
    if (records / "manifest.json").exists():
        seg_size = json.loads((records / "manifest.json").read_text())["config"]["records"]["seg_size"]
        if seg_size != config.records.seg_size:
            raise SystemExit(f"{records} holds {seg_size} px seg records, this run wants "
                             f"{config.records.seg_size}: use --fresh or another --out")
    else:
        build_benchmark_records(out, config, args.data)
    built = time.perf_counter()
    entry = fit_segmenter(records, out / "models", config, out / "runs", verbose=2)
    done = time.perf_counter()
    result = {
        "data": args.data, "profile": args.profile, "backbone": config.segmenter.backbone, "image_size": config.segmenter.image_size,
        "weights": config.segmenter.weights, "learning_rate": config.segmenter.learning_rate,
        "unfreeze": [list(u) for u in config.segmenter.unfreeze],
        "epochs_run": entry["epochs_run"],
        "val": {k: round(v, 4) for k, v in entry["metrics"]["val"].items()},
        "test": {k: round(v, 4) for k, v in entry["metrics"].get("test", {}).items()},
        "test_by_source": per_source_metrics(records, out / "models", config),
        "records_seconds": round(built - start, 1), "train_seconds": round(done - built, 1),
    }
    if args.set:
        result["overrides"] = args.set
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
