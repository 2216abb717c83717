"""Speed of the synthetic data generator (the demo's and the tests' data): images/s at a few sizes.

usage: python bench/synthetic.py [--n-images 120]
(The test suite used to assert a time limit on this; tests never assert on wall-clock time.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import OUT, Timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=120)
    args = parser.parse_args()
    from kmel.data.synthetic import make_synthetic_dataset

    result = {}
    for size in (128, 256, 512):
        with tempfile.TemporaryDirectory() as tmp, Timer() as timer:
            make_synthetic_dataset(Path(tmp), n_images=args.n_images, seed=2, size=size)
        result[f"{size}px_images_per_s"] = round(args.n_images / timer.seconds, 1)
        print(f"{args.n_images} synthetic images at {size} px: {timer.seconds:.2f} s ({result[f'{size}px_images_per_s']} img/s)")
    (OUT / "synthetic").mkdir(parents=True, exist_ok=True)
    (OUT / "synthetic" / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
