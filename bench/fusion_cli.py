"""Image + metadata fusion through the command line, on synthetic ISIC 2024 data: what `kmel train fusion` adds.

usage: python bench/fusion_cli.py [--n-images 6000] [--out bench/out/fusion-cli] [--folds 3]

The whole walk a user of ISIC 2024 data runs, each step a `kmel` command in a subprocess: make-synthetic
--style isic2024 (train-metadata.csv + train-image.hdf5: patients with many lesions, ~1 % malignant, ``tbp_lv_*``
measurements shifted a little for malignant lesions) → build-records → train seg (on a synthetic ISIC-style folder
with masks: ISIC 2024 has none) → train cls (both small, a few minutes on 2 cores: the image model is weak, as a
first model on new data is) → train fusion →
evaluate (image-only and fused side by side). Prints the test split's image-only and fused AUC and partial AUC
above 80 % TPR with their paired 95 % intervals (from the fusion report) and each step's seconds; writes
OUT/result.json. Sized for ~10 minutes on 2 cores: 6,000 crops of 64 px, 2 epochs of 20 steps per model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, REPO

SETTINGS = """\
records:
  image_size: 96
  seg_size: 64
  shard_size: 512
segmenter:
  backbone: efficientnet_lite0
  weights: imagenet
  image_size: 64
  decoder_filters: [64, 32, 16, 8, 8]
  batch_size: 16
  epochs: 2
  steps_per_epoch: 20
  unfreeze: [[0, "all"]]
classifier:
  backbone: efficientnet_lite0
  weights: imagenet
  image_size: 64
  batch_size: 32
  epochs: 2
  steps_per_epoch: 20
  unfreeze: [[0, "all"]]
  bootstrap: 200
fusion:
  folds: {folds}
  bootstrap: 500
"""


def kmel(*args: object) -> float:
    """Run one kmel command; its seconds. Only build-records may exit 1 (a file it could not read, reported)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode not in ((0, 1) if args[0] == "build-records" else (0,)):
        sys.exit(f"kmel {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=6000)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT / "fusion-cli")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = out / "profile.yaml"
    profile.write_text(SETTINGS.format(folds=args.folds))
    data, records, models = out / "data", out / "records", out / "models"
    seconds = {}
    if not (data / "train-metadata.csv").exists():
        seconds["make-synthetic"] = kmel("make-synthetic", data, "--style", "isic2024", "--n-images", args.n_images,
                                         "--size", 64)
    seconds["build-records"] = kmel("build-records", "--data-dir", data, "--out", records, "--profile", profile,
                                    "--quiet")
    # ISIC 2024 publishes no lesion masks: the segmenter learns from a synthetic ISIC-style folder with masks, as a
    # user's would from ISIC 2018's, and then crops the 2024 tiles.
    seg_data, seg_records = out / "seg-data", out / "seg-records"
    if not (seg_data / "masks").exists():
        seconds["make-synthetic (masks)"] = kmel("make-synthetic", seg_data, "--n-images", 400, "--size", 96)
    seconds["build-records (masks)"] = kmel("build-records", "--data-dir", seg_data, "--out", seg_records,
                                            "--profile", profile, "--quiet")
    common = ("--out", models, "--profile", profile, "--logdir", out / "runs", "--quiet")
    seconds["train seg"] = kmel("train", "seg", "--records", seg_records, *common)
    seconds["train cls"] = kmel("train", "cls", "--records", records, *common)
    seconds["train fusion"] = kmel("train", "fusion", "--records", records, "--out", models, "--profile", profile,
                                   "--quiet")
    seconds["evaluate"] = kmel("evaluate", "--records", records, "--models", models, "--out", out / "report",
                               "--quiet")
    report = json.loads((models / "fusion" / "report" / "report.json").read_text())
    comparison = report["image_vs_fused"]["overall"]
    manifest = json.loads((records / "manifest.json").read_text())
    result = {
        "command": " ".join(["python", *sys.argv]), "n_images": args.n_images,
        "records": manifest["n_records"]["img"], "fusion": json.loads((models / "pipeline.json").read_text())["fusion"],
        "test": comparison, "importance_gain_top": dict(list(report["image_vs_fused"]["importance_gain"].items())[:10]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    for metric in ("auc", "pauc80"):
        e = comparison[metric]
        print(f"test {metric}: image {e['image']:.4f} {e.get('image_ci95')} -> fused {e['fused']:.4f} "
              f"{e.get('fused_ci95')}; difference {e['difference']:+.4f} {e.get('difference_ci95')}")
    print(f"test: {comparison['n']} lesions, {comparison['n_positive']} malignant; trees {result['fusion']['n_trees']}")
    print("seconds:", result["seconds"])
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
