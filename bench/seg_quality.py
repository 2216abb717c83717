"""Segmenter quality on real data: train a profile's segmenter (cpu-small: the EfficientNet-Lite0-encoder
U-Net from ImageNet weights; `--backbone resnet18 --weights none` for the from-scratch ResNet18) on the
1,600 train images of ../shared/data/isic2018-task1-256, report val and test mean Jaccard and
thresholded Jaccard.

usage: python bench/seg_quality.py [--epochs N] [--profile cpu-small] [--out bench/out/seg]
       [--backbone efficientnet_lite0] [--weights imagenet] [--image-size 128]
       [--set segmenter.unfreeze='[[0, "4"], [2, "all"]]' ...]
(the overrides go over the profile's segmenter settings; --image-size also sets the records' seg_size)
The fixed train/val/test partition of labels.csv is used (not kmel's own split), so numbers are
comparable across runs and with the model-free Otsu mask of kmel.lesion (measured on the same
594 test images: mean Jaccard 0.635, thresholded Jaccard 0.463).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from _common import OUT, stage_isic2018_as_2019


def build_fixed_split_records(out: Path, config) -> Path:
    """Records whose split is the benchmark's fixed partition (train 1,600 / val 400 / test 594)."""
    import pandas as pd

    from _common import SHARED
    from kmel import metadata

    labels = pd.read_csv(SHARED / "isic2018-task1-256" / "labels.csv").set_index("image_id")["split"].to_dict()
    original = metadata.split_table

    def fixed_split(table, *args, **kwargs):
        table = table.copy()
        # 2019 lists older images as ISIC_xxxxxxx_downsampled: match on the base id.
        table["split"] = table["base_id"].map(labels)
        missing = table["split"].isna()
        if missing.any():
            raise SystemExit(f"{int(missing.sum())} benchmark images have no fixed split: {table.loc[missing, 'image_id'].tolist()[:5]}")
        return table

    import kmel.records as records

    records.split_table = fixed_split
    try:
        data = stage_isic2018_as_2019(out / "data")
        records.build_records(data, out / "records", config, progress=True)
    finally:
        records.split_table = original
    return out / "records"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--out", default=str(OUT / "seg"))
    parser.add_argument("--fresh", action="store_true", help="rebuild records and retrain from scratch")
    parser.add_argument("--backbone", default=None, help="segmenter backbone (default: the profile's)")
    parser.add_argument("--weights", default=None, help="imagenet | none | PATH (default: the profile's)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="segmenter input side; the seg records are written at this size too")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                        help="any other config override, value read as YAML; repeatable")
    args = parser.parse_args()
    from kmel.config import load_config
    from kmel.train import fit_segmenter

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
        build_fixed_split_records(out, config)
    built = time.perf_counter()
    entry = fit_segmenter(records, out / "models", config, out / "runs", verbose=2)
    done = time.perf_counter()
    result = {
        "profile": args.profile, "backbone": config.segmenter.backbone, "image_size": config.segmenter.image_size,
        "weights": config.segmenter.weights, "learning_rate": config.segmenter.learning_rate,
        "unfreeze": [list(u) for u in config.segmenter.unfreeze],
        "epochs_run": entry["epochs_run"],
        "val": {k: round(v, 4) for k, v in entry["metrics"]["val"].items()},
        "test": {k: round(v, 4) for k, v in entry["metrics"].get("test", {}).items()},
        "records_seconds": round(built - start, 1), "train_seconds": round(done - built, 1),
    }
    if args.set:
        result["overrides"] = args.set
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
