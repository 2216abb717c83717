"""``demo``: the whole pipeline on synthetic data with the ``cpu-small`` profile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kmel.config import Config, load_config


def demo_config(quick: bool = False) -> Config:
    """cpu-small, or for ``quick`` tiny sizes and one short epoch each (a smoke test)."""
    if not quick:
        return load_config("cpu-small")
    return load_config("cpu-small", {
        "records.image_size": 96, "records.seg_size": 64, "records.shard_size": 64,
        "segmenter.image_size": 64, "segmenter.epochs": 1, "segmenter.steps_per_epoch": 3,
        "segmenter.batch_size": 8,
        # EfficientNet-Lite0 (no squeeze-excite: it traces in half B0's time); the tests train B0 elsewhere
        "classifier.backbone": "efficientnet_lite0",
        "classifier.image_size": 64, "classifier.epochs": 1, "classifier.steps_per_epoch": 3,
        "classifier.batch_size": 8, "classifier.bootstrap": 50,
    })


def run_demo(
    out: Path, n_images: int = 240, quick: bool = False, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """make-synthetic → build-records → train seg → crops → train cls → predict → evaluate."""
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_prediction_folder, make_synthetic_dataset
    from kmel.evaluation.evaluate import evaluate_predictions
    from kmel.serving.runner import predict_folder
    from kmel.training.train import fit_classifier, fit_segmenter

    out = Path(out)
    config = demo_config(quick)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = round(now - start, 1)
        start = now
        print(f"[demo] {name} done in {timings[name]} s", flush=True)

    data, records, models, runs = out / "data", out / "tfrecords", out / "saved_models", out / "runs"
    size = 96 if quick else 256
    make_synthetic_dataset(data, n_images=n_images, seed=seed, size=size)
    truth = make_prediction_folder(out / "predict_images", n_images=24 if not quick else 8, seed=seed + 1, size=size)
    lap("make-synthetic")
    build_records(data, records, config, progress=progress)
    lap("build-records")
    fit_segmenter(records, models, config, runs, verbose=2)
    lap("train seg")
    entry = fit_classifier(records, models, config, runs, verbose=2, progress=progress)
    lap("crops + train cls")
    csv = out / "predictions.csv"
    if csv.exists():
        csv.unlink()
    summary = predict_folder(out / "predict_images", csv, models, progress=progress)
    lap("predict")
    report = evaluate_predictions(csv, out / "predict_images" / "truth.csv", out / "reports", config)
    lap("evaluate")
    return {
        "test report (records' test split)": str(models / "report" / "report.md"),
        "held-out predictions": f"{csv} ({summary.n_ok} ok, {summary.n_error} errors)",
        "held-out report": str(out / "reports" / "report.md"),
        "held-out AUC": report.get("summary", {}).get("auc"),
        f"threshold (chosen on {entry['threshold_from']})": entry["threshold"],
        "tensorboard": f"tensorboard --logdir {runs}",
        "timings (s)": timings,
        "n held-out images": len(truth),
    }
