"""images/s of build-records' prepare stage vs a plain single-process decode+resize loop.

usage: python bench/build_records.py [--workers N]
Prints, for the 24 full-resolution ISIC images and the 2,594 256 px images: the plain loop's
images/s (decode + resize + JPEG encode, one process), kmel's parallel prepare stage (which also
hashes, estimates skin tone and writes payloads), and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import SHARED, Timer, require_shared


def plain_loop(paths: list[Path], size: int) -> float:
    import cv2

    from kmel.images import encode_jpeg, resize_long_side

    with Timer() as t:
        for p in paths:
            image = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
            encode_jpeg(resize_long_side(image, size), 95)
    return len(paths) / t.seconds


def kmel_prepare(paths: list[Path], size: int, workers: int) -> float:
    from kmel.config import load_config
    from kmel.prepare import PrepareTask, prepare_image
    from kmel.records import resolve_workers, run_parallel

    config = load_config("reference", {"records.image_size": size})
    cache = Path(tempfile.mkdtemp())
    tasks = [PrepareTask(p.stem, str(p), "", str(cache), config.records, config.crops) for p in paths]
    with Timer() as t:
        results = run_parallel(prepare_image, tasks, resolve_workers(workers), "prepare", progress=False)
    shutil.rmtree(cache)
    assert not [r for r in results if "error" in r]
    return len(paths) / t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    require_shared()
    sets = {
        "24 full-resolution (to 512 px)": (sorted((SHARED / "isic-archive-fullres" / "images").glob("*.jpg")), 512),
        "2,594 256 px (to 256 px)": (sorted((SHARED / "isic2018-task1-256" / "images").glob("*.jpg")), 256),
    }
    print(f"{'set':34s} {'plain img/s':>12s} {'kmel img/s':>12s} {'ratio':>7s}")
    for name, (paths, size) in sets.items():
        plain = plain_loop(paths, size)
        ours = kmel_prepare(paths, size, args.workers)
        print(f"{name:34s} {plain:12.1f} {ours:12.1f} {ours / plain:7.2f}")


if __name__ == "__main__":
    main()
