"""End-to-end predict speed vs pure model forward speed of the same two exported models.

usage: python bench/predict.py --models bench/out/cls/models [--n256 500] [--batch-size 16]
Prints images/s of `predict` (decode → segment → crop → hair removal → skin tone → classify, CSV
written) on the 24 full-resolution images and on N of the 256 px images; the images/s of the
segmenter + classifier forward passes alone on already-prepared tensors; their ratio (aim ≥ 0.7);
and the peak resident memory of this process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np

from _common import SHARED, Timer, require_shared


def forward_only(models: Path, n: int, batch_size: int) -> float:
    import tensorflow as tf

    from kmel.crops import make_segment_fn
    from kmel.predict import load_pipeline_config, make_classify_fn

    config, _ = load_pipeline_config(models)
    segment, seg_size = make_segment_fn(models)
    classify = make_classify_fn(models, tta=False)
    size = config.classifier.image_size
    seg_x = np.random.default_rng(0).uniform(0, 255, (batch_size, seg_size, seg_size, 3)).astype(np.float32)
    cls_x = np.random.default_rng(1).uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
    segment(seg_x), classify(cls_x)  # warm-up
    batches = max(1, n // batch_size)
    with Timer() as t:
        for _ in range(batches):
            segment(seg_x)
            classify(cls_x)
    del tf
    return batches * batch_size / t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", required=True)
    parser.add_argument("--n256", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    require_shared()
    from kmel.predict import predict_folder

    models = Path(args.models)
    tmp = Path(tempfile.mkdtemp())
    small = tmp / "256"
    small.mkdir()
    for p in sorted((SHARED / "isic2018-task1-256" / "images").glob("*.jpg"))[: args.n256]:
        (small / p.name).symlink_to(p)
    sets = {"24 full-resolution": SHARED / "isic-archive-fullres" / "images", f"{args.n256} x 256 px": small}
    forward = forward_only(models, 128, args.batch_size)
    print(f"pure forward (segmenter + classifier): {forward:.2f} images/s")
    print(f"{'set':22s} {'predict img/s':>14s} {'ratio to forward':>17s}")
    for name, folder in sets.items():
        out = tmp / f"{name.replace(' ', '_')}.csv"
        summary = predict_folder(folder, out, models, batch_size=args.batch_size, progress=False)
        rate = (summary.n_ok + summary.n_error) / summary.seconds  # from first image to last row (models loaded)
        print(f"{name:22s} {rate:14.2f} {rate / forward:17.2f}   ({summary.n_ok} ok, {summary.n_error} errors)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak resident memory of this process: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
