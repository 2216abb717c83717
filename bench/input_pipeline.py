"""images/s that make_dataset delivers for training, at 256 and 512 px, with and without augmentation.

usage: python bench/input_pipeline.py [--batches 40]
Builds records from 400 real 256 px images (resized up for the 512 px case), then times iterating
the training dataset (parse, decode, [resize], shuffle, batch, [augment], prefetch) of batch 32:
``seg`` (image + mask, stored square at the segmenter size: no resize) and ``img`` (classifier
records, long side at the size: resized to a square).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import Timer, stage_isic2018_as_2019


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    from kmel.config import load_config
    from kmel.data.datasets import make_dataset
    from kmel.data.records import build_records

    tmp = Path(tempfile.mkdtemp())
    data = stage_isic2018_as_2019(tmp / "data", limit=400)
    print(f"{'size':>5s} {'kind':>5s} {'augment':>8s} {'images/s':>10s}")
    for size in (256, 512):
        sizes = {"records.seg_size": size, "records.image_size": size, "segmenter.image_size": size,
                 "segmenter.batch_size": 32, "classifier.image_size": size, "classifier.batch_size": 32}
        out = tmp / f"rec{size}"
        build_records(data, out, load_config("reference", sizes), progress=False)
        for kind in ("seg", "img"):
            stage = "segmenter" if kind == "seg" else "classifier"
            for augment in (False, True):
                cfg = load_config("reference", {**sizes, f"{stage}.augment": augment})
                it = iter(make_dataset(out, "train", kind, True, cfg))
                next(it)  # warm-up: tracing and the first shuffle buffer fill
                with Timer() as t:
                    n = sum(int(next(it)[0].shape[0]) for _ in range(args.batches))
                print(f"{size:5d} {kind:>5s} {str(augment):>8s} {n / t.seconds:10.1f}", flush=True)


if __name__ == "__main__":
    main()
