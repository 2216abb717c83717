"""`predict` at a profile's model sizes: end-to-end images/s against the models' own forward pass,
and the peak memory of the whole process tree, on 24, 99 and 1,000+ real images.

usage: python bench/predict.py [--profile reference] [--models DIR] [--runtimes tf,tflite-float32,...]
                               [--sets 24,99,1000] [--batch-size N]

- Models: with ``--models`` those; otherwise the profile's two models made by ONE short training step
  each on synthetic 512 px data (random-ish weights: speed does not depend on the weights), cached in
  ``bench/out/predict-<profile>/models``; their TFLite files are exported there too when a tflite
  runtime is asked for.
- Image sets: the 24 full-resolution ISIC Archive images (3–7 MP), then the 256 px ISIC 2018 images
  upscaled to 2,048 px on the long side (JPEG q95, cached in ``bench/out/predict-images``) to make up
  99 and 1,000 images. Real images throughout; the upscaled ones are 3 MP like the archive's.
- Each run is the real command, ``python -m kmel predict FOLDER --out X.csv``, in a fresh process; its
  images/s is the one it prints (first image to last row written: start-up and model loading excluded).
  A sampler reads the resident memory (VmRSS) of that process and all its descendants from /proc every
  0.1 s: the peak, and the resident memory after 10 %, 50 % and 100 % of the rows (flatness).
- Forward only: the same two models on prepared tensors (segmenter input and classifier crop sizes),
  the batch ``predict`` uses, in this process, one model after the other: the ceiling of a predict
  that did nothing else. ``predict`` runs the segmenter (with decoding and cropping) in one thread and
  the classifier in another, so where the models leave cores idle it can exceed 1.0 of this figure.

Aims (issue 14): predict ≥ 0.9 of forward; peak ≤ 3 GiB and within 10 % between 99 and 1,000 images;
≥ 6× the reference PyTorch pipeline's 1.30 images/s on 99 full-resolution images (measured by the
issue's author on this machine with torch 2.15; that pipeline is not in this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import OUT, REPO, SHARED, Timer, require_shared

REFERENCE_PYTORCH_IMAGES_PER_S = 1.30  # issue 14: the reference pipeline's predict.py on 99 full-resolution images
GIB = 1024**3


# === Models made by one short training step ===


def make_profile_models(profile: str, out: Path) -> Path:
    """The profile's segmenter and classifier after one training step each (cached in ``out/models``)."""
    models = out / "models"
    if (models / "segmenter" / "saved_model.pb").exists() and (models / "classifier" / "saved_model.pb").exists():
        return models
    from kmel.config import load_config
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_synthetic_dataset
    from kmel.training.train import fit_classifier, fit_segmenter

    one_step = {"weights": "none", "batch_size": 2, "steps_per_epoch": 1, "epochs": 1, "unfreeze": [[0, "all"]]}
    config = load_config(profile, {**{f"segmenter.{k}": v for k, v in one_step.items()},
                                   **{f"classifier.{k}": v for k, v in one_step.items()},
                                   "classifier.bootstrap": 20, "records.shard_size": 64})
    size = config.records.image_size
    print(f"making {profile} models by one training step each ({size} px synthetic data) -> {models}", flush=True)
    make_synthetic_dataset(out / "data", n_images=60, seed=0, size=size)
    build_records(out / "data", out / "records", config, progress=False)
    fit_segmenter(out / "records", models, config, out / "runs", verbose=0)
    fit_classifier(out / "records", models, config, out / "runs", verbose=0, progress=False)
    return models


# === Image sets ===


def make_image_sets(sizes: list[int], long_side: int = 2048) -> dict[int, Path]:
    """Folders of ``n`` images: the 24 full-resolution ones first, then upscaled 256 px ones (symlinks)."""
    import cv2

    full = sorted((SHARED / "isic-archive-fullres" / "images").glob("*.jpg"))
    small = sorted((SHARED / "isic2018-task1-256" / "images").glob("*.jpg"))
    cache = OUT / "predict-images" / f"upscaled-{long_side}"
    cache.mkdir(parents=True, exist_ok=True)
    need = max(sizes) - len(full)
    if need > len(small):
        sys.exit(f"only {len(full) + len(small)} real images: ask for at most that many")
    made = 0
    for src in small[:need]:
        dst = cache / src.name
        if not dst.exists():
            image = cv2.imread(str(src), cv2.IMREAD_COLOR)
            h, w = image.shape[:2]
            scale = long_side / max(h, w)
            big = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(dst) + ".tmp.jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])
            os.replace(str(dst) + ".tmp.jpg", dst)
            made += 1
    if made:
        print(f"upscaled {made} images to {long_side} px -> {cache}", flush=True)
    sets = {}
    for n in sizes:
        folder = OUT / "predict-images" / f"set-{n}"
        if not folder.is_dir() or len(list(folder.iterdir())) != n:
            folder.mkdir(parents=True, exist_ok=True)
            for link in folder.iterdir():
                link.unlink()
            chosen = (full + [cache / p.name for p in small])[:n]
            for i, src in enumerate(chosen):
                (folder / f"{i:05d}_{src.name}").symlink_to(src.resolve())
        sets[n] = folder
    return sets


# === Memory of a process tree, from /proc ===


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
    except OSError:
        pass
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (VmRSS summed)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo += _children(p)
    return total


def count_rows(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return max(0, sum(1 for _ in fh) - 1)
    except OSError:
        return 0


def run_predict(models: Path, folder: Path, n: int, runtime: str, batch_size: int | None, work: Path) -> dict:
    """``python -m kmel predict`` in a fresh process, sampled for memory; its printed images/s."""
    out = work / f"{folder.name}-{runtime}.csv"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kmel", "predict", str(folder), "--out", str(out), "--models", str(models), "--quiet"]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    if runtime.startswith("tflite"):
        cmd += ["--runtime", "tflite", "--tflite-precision", runtime.split("-", 1)[1]]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, marks, samples = 0, {}, []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            rss = tree_rss(proc.pid)
            peak = max(peak, rss)
            rows = count_rows(out)
            samples.append((rows, rss))
            for frac in (0.1, 0.5, 1.0):
                if frac not in marks and rows >= frac * n:
                    marks[frac] = rss
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    text, _ = proc.communicate()
    done.set()
    sampler.join()
    match = re.search(r"(\d+) ok, (\d+) errors.*?\(([\d.]+) images/s", text)
    if proc.returncode != 0 or not match:
        print(text[-3000:])
        raise SystemExit(f"predict failed (exit {proc.returncode}) on {folder}")
    return {"ok": int(match[1]), "errors": int(match[2]), "images_per_s": float(match[3]), "peak_gib": peak / GIB,
            "rss_gib_at": {f"{int(k * 100)}%": round(v / GIB, 3) for k, v in sorted(marks.items())}}


# === Forward only ===


def forward_only(models: Path, runtime: str, batch_size: int | None, n: int = 64) -> tuple[float, float, float]:
    """Images/s of the segmenter + classifier alone, on prepared tensors, in the batches predict uses,
    one after the other; and each model's milliseconds per image."""
    from kmel.serving.runtime import load_pipeline_config, load_runtime_models

    config, pipeline = load_pipeline_config(models)
    tflite = runtime.startswith("tflite")
    loaded = load_runtime_models(models, pipeline, "tflite" if tflite else "tf",
                                 runtime.split("-", 1)[1] if tflite else "float32")
    batch = batch_size or config.predict.batch_size
    rng = np.random.default_rng(0)
    seg_x = rng.uniform(0, 255, (batch, loaded.seg_size, loaded.seg_size, 3)).astype(np.float32)
    cls_x = rng.uniform(0, 255, (batch, loaded.cls_size, loaded.cls_size, 3)).astype(np.float32)
    loaded.segment(seg_x), loaded.classify(cls_x)  # warm-up
    batches = max(1, n // batch)
    seg_s = cls_s = 0.0
    for _ in range(batches):
        with Timer() as t:
            loaded.segment(seg_x)
        seg_s += t.seconds
        with Timer() as t:
            loaded.classify(cls_x)
        cls_s += t.seconds
    images = batches * batch
    return images / (seg_s + cls_s), 1000 * seg_s / images, 1000 * cls_s / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="reference", help="Profile whose model sizes to use [reference].")
    parser.add_argument("--models", default=None, help="Use these exported models instead of making them.")
    parser.add_argument("--runtimes", default="tf,tflite-float32",
                        help="Comma list of tf, tflite-float32, tflite-float16, tflite-int8 [tf,tflite-float32].")
    parser.add_argument("--sets", default="24,99,1000", help="Image-set sizes [24,99,1000].")
    parser.add_argument("--batch-size", type=int, default=None, help="predict --batch-size [the pipeline's].")
    parser.add_argument("--records", default=None,
                        help="Records for the TFLite export's calibration and parity images [the made models' own].")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    require_shared()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    sizes = [int(s) for s in args.sets.split(",")]
    out = OUT / f"predict-{args.profile}"
    models = Path(args.models) if args.models else make_profile_models(args.profile, out)
    wanted = sorted({r.split("-", 1)[1] for r in runtimes if r.startswith("tflite")})
    if wanted:
        from kmel.serving.litert import export_tflite
        from kmel.serving.runtime import tflite_status

        missing = [p for p in wanted if tflite_status(models, p) != "ok"]
        if missing:
            records = Path(args.records) if args.records else out / "records"
            with Timer() as t:
                export_tflite(models, records_dir=records, precisions=missing, progress=False)
            print(f"exported TFLite {', '.join(missing)} in {t.seconds:.0f} s", flush=True)
    sets = make_image_sets(sizes)
    work = out / "runs-predict"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for runtime in runtimes:
        forward, seg_ms, cls_ms = forward_only(models, runtime, args.batch_size)
        results[runtime] = {"forward_images_per_s": forward, "segmenter_ms_per_image": seg_ms,
                            "classifier_ms_per_image": cls_ms}
        print(f"\n[{runtime}] forward only (segmenter + classifier, one after the other): {forward:.2f} images/s "
              f"(segmenter {seg_ms:.0f} ms/image, classifier {cls_ms:.0f} ms/image)", flush=True)
        print(f"{'images':>7s} {'predict img/s':>14s} {'÷ forward':>10s} {'× reference':>12s} {'peak GiB':>9s}  "
              "RSS at 10/50/100 % of rows", flush=True)
        for n, folder in sets.items():
            r = run_predict(models, folder, n, runtime, args.batch_size, work)
            r["ratio_to_forward"] = r["images_per_s"] / forward
            r["x_reference"] = r["images_per_s"] / REFERENCE_PYTORCH_IMAGES_PER_S
            results[runtime][str(n)] = r
            at = " / ".join(f"{v:.2f}" for v in r["rss_gib_at"].values())
            print(f"{n:7d} {r['images_per_s']:14.2f} {r['ratio_to_forward']:10.2f} {r['x_reference']:12.1f} "
                  f"{r['peak_gib']:9.2f}  {at}   ({r['ok']} ok, {r['errors']} errors)", flush=True)
        peaks = {n: results[runtime][str(n)]["peak_gib"] for n in sizes}
        if 99 in peaks and max(sizes) >= 1000:
            growth = peaks[max(sizes)] / peaks[99] - 1
            results[runtime]["peak_growth_99_to_max"] = growth
            ratio = min(results[runtime][str(n)]["ratio_to_forward"] for n in sizes)
            x_ref = results[runtime]["99"]["x_reference"] if "99" in results[runtime] else float("nan")
            print(f"aims: ratio ≥ 0.9: {'met' if ratio >= 0.9 else 'NOT met'} (lowest {ratio:.2f}); "
                  f"peak ≤ 3 GiB: {'met' if max(peaks.values()) <= 3 else 'NOT met'} ({max(peaks.values()):.2f}); "
                  f"flat 99→{max(sizes)} within 10 %: {'met' if abs(growth) <= 0.10 else 'NOT met'} ({growth:+.1%}); "
                  f"≥ 6× reference on 99: {'met' if x_ref >= 6 else 'NOT met'} ({x_ref:.1f}×)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
