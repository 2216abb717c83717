"""Seconds per classifier training step of a profile, from scratch (``--weights none``), on random images.

usage: python bench/step_time.py --profile ham7-resnet152 [--batch-size 8] [--stages head,all] [--steps 3]

Builds the profile's classifier at its image size, compiles it as ``train cls`` does (kmel's loss and optimizer,
graph mode), and for each unfreezing stage runs one step to trace the graph, then times ``--steps`` steps; prints
the tracing time and the median step. No data, no records: what the hardware gives for the model alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401 (puts the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="ham7-resnet152")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stages", default="head,all", help="unfreezing stages to time, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    from kmel.config import load_config
    from kmel.models.classifier import build_classifier, set_trainable_blocks
    from kmel.models.heads import head_from_manifest
    from kmel.training.losses import make_classifier_loss
    from kmel.training.optimizers import make_classifier_optimizer

    config = load_config(args.profile, {"classifier.weights": "none"})
    cc, rc = config.classifier, config.records
    head = head_from_manifest({"task": rc.task, "classes": rc.classes, "malignant_classes": rc.malignant_classes})
    model = build_classifier(cc, head.n_outputs)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, cc.image_size, cc.image_size, 3)).astype("float32")
    y = rng.integers(0, head.n_outputs if head.multiclass else 2, (args.batch_size, 1)).astype("float32")
    print(f"{args.profile}: {cc.backbone} head {cc.head}, {cc.image_size} px, batch {args.batch_size}, weights none")
    for stage in args.stages.split(","):
        set_trainable_blocks(model, stage, freeze_batchnorm=False)
        model.compile(optimizer=make_classifier_optimizer(cc, total_steps=100),
                      loss=make_classifier_loss(cc, head.n_outputs), jit_compile=False)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        trace = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        print(f"  stage {stage}: first step (tracing) {trace:.1f} s, then {statistics.median(times):.2f} s a step "
              f"(median of {args.steps}: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
