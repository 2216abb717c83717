"""images/s that make_dataset delivers for training, at 256 and 512 px, with and without augmentation.

usage: python bench/input_pipeline.py [--batches 30]
Builds seg records from 400 real 256 px images (resized up for the 512 px case), then times
iterating the training dataset (decode, resize, shuffle, batch, [augment], prefetch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import Timer, stage_isic2018_as_2019


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    from kmel.config import load_config
    from kmel.data import make_dataset
    from kmel.records import build_records

    tmp = Path(tempfile.mkdtemp())
    data = stage_isic2018_as_2019(tmp / "data", limit=400)
    print(f"{'size':>5s} {'augment':>8s} {'images/s':>10s}")
    for size in (256, 512):
        config = load_config("reference", {"records.seg_size": size, "records.image_size": size,
                                           "segmenter.image_size": size, "segmenter.batch_size": 32})
        out = tmp / f"rec{size}"
        build_records(data, out, config, progress=False)
        for augment in (False, True):
            cfg = load_config("reference", {"records.seg_size": size, "records.image_size": size,
                                            "segmenter.image_size": size, "segmenter.batch_size": 32,
                                            "segmenter.augment": augment})
            ds = make_dataset(out, "train", "seg", True, cfg)
            it = iter(ds)
            next(it)  # warm-up: tracing and the first shuffle buffer fill
            with Timer() as t:
                n = sum(int(next(it)[0].shape[0]) for _ in range(args.batches))
            print(f"{size:5d} {str(augment):>8s} {n / t.seconds:10.1f}")


if __name__ == "__main__":
    main()
