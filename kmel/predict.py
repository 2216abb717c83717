"""``predict INPUT_DIR OUT_CSV``: exported models over a folder of images, one CSV row per file.

Only what was exported is loaded (two SavedModels and ``pipeline.json``). Each image goes through
the same :class:`kmel.crops.CropPipeline` as the training crops (segment → crop → hair removal →
skin tone), then the classifier. Rows are appended and flushed batch by batch; rerunning the same
command resumes: files already in the CSV are skipped, so a killed run loses nothing and writes
no duplicates. Unreadable files get a row with ``status=error`` and the reason.
"""

from __future__ import annotations

import csv
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from kmel import constants as C
from kmel.config import Config, config_from_dict
from kmel.images import ImageReadError, list_images, load_image

COLUMNS = (
    "image", "path", "probability", "prediction", "label", "threshold", "skin_tone_group", "ita",
    "ita_category", "crop_mode", "box_x0", "box_y0", "box_x1", "box_y1", "tta", "status", "error",
)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula gets a leading apostrophe (CSV injection).

    Numbers written as text (``-22.11``) are numbers, not formulas, and stay as they are.
    """
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


@dataclass
class PredictSummary:
    n_ok: int = 0
    n_error: int = 0
    n_malignant: int = 0
    n_resumed: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.n_ok + self.n_error) / self.seconds if self.seconds else 0.0


def load_pipeline_config(models_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The config the exported models were trained with (preprocessing must match it)."""
    from kmel.export import read_pipeline

    pipeline = read_pipeline(models_dir)
    for part in ("segmenter", "classifier"):
        if part not in pipeline:
            raise FileNotFoundError(
                f"{Path(models_dir) / C.PIPELINE_JSON} has no {part}: train it first (`python cli.py train "
                f"{'seg' if part == 'segmenter' else 'cls'}`) or pass --models pointing at exported models"
            )
    seg = pipeline["segmenter"]
    config = config_from_dict({"records": seg["records"], "crops": seg["crops"], "segmenter": seg["config"],
                               "classifier": pipeline["classifier"]["config"]})
    return config, pipeline


def _done_paths(out_csv: Path) -> set[str]:
    """Paths already written by an earlier (possibly killed) run; a torn last line is cut off."""
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    data = out_csv.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out_csv.write_bytes(data)
    with open(out_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{out_csv} exists and is not a kmel predict CSV: choose another OUT_CSV or delete it")
        return {row["path"] for row in reader}


def _load(path: Path) -> tuple[np.ndarray | None, str]:
    try:
        return load_image(path), ""
    except ImageReadError as exc:
        return None, str(exc)
    except Exception as exc:  # an unexpected decoder failure is still one bad file, not the end of the run
        return None, f"{path}: {type(exc).__name__}: {exc}"


def _batches(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def make_classify_fn(models_dir: str | Path, tta: bool) -> Any:
    import tensorflow as tf

    from kmel.export import load_serving

    serve = load_serving(Path(models_dir) / C.CLASSIFIER_DIR).signatures["serve"]

    def run(batch: np.ndarray) -> np.ndarray:
        x = tf.constant(batch, tf.float32)
        views = [x] if not tta else [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
        probs = [next(iter(serve(v).values())).numpy().reshape(-1) for v in views]
        return np.mean(probs, axis=0)

    return run


def predict_folder(
    input_dir: str | Path,
    out_csv: str | Path,
    models_dir: str | Path = "saved_models",
    batch_size: int | None = None,
    tta: bool = False,
    explain_dir: str | Path | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image under ``input_dir`` into ``out_csv`` (resuming a partial CSV)."""
    from kmel.crops import CropPipeline, make_segment_fn

    input_dir, out_csv = Path(input_dir), Path(out_csv)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    config, pipeline = load_pipeline_config(models_dir)
    threshold = float(pipeline["classifier"]["threshold"])
    class_names = pipeline["classifier"].get("class_names", ["benign", "malignant"])
    batch_size = batch_size or config.predict.batch_size
    segment, seg_size = make_segment_fn(models_dir)
    classify = make_classify_fn(models_dir, tta)
    explainer = None
    if explain_dir is not None:
        from kmel.explain import make_gradcam_fn

        explainer = make_gradcam_fn(models_dir)
        Path(explain_dir).mkdir(parents=True, exist_ok=True)

    files, skipped = list_images(input_dir)
    done = _done_paths(out_csv)
    summary = PredictSummary(n_resumed=len(done))
    todo = [p for p in files if str(p) not in done]
    bad = [(p, reason) for p, reason in skipped if str(p) not in done]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo) + len(bad), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with open(out_csv, "a", newline="", encoding="utf-8") as handle, \
            CropPipeline(segment, seg_size, config, config.predict.workers) as crops, \
            ThreadPoolExecutor(max(1, (os.cpu_count() or 1))) as loader:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()

        def emit(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                writer.writerow({k: escape_cell(row.get(k, "")) for k in COLUMNS})
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(rows))
            bar.set_postfix(ok=summary.n_ok, errors=summary.n_error)

        def error_row(path: Path, reason: str) -> dict[str, Any]:
            summary.n_error += 1
            summary.errors.append((str(path), reason))
            return {"image": path.stem, "path": str(path), "tta": tta, "status": "error", "error": reason}

        emit([error_row(p, r) for p, r in bad])
        # One batch of look-ahead: the next batch decodes while this one is segmented and classified,
        # and memory stays flat in the number of images.
        queue: deque[tuple[list[Path], list[Any]]] = deque()
        batch_iter = _batches(todo, batch_size)

        def submit_next() -> None:
            paths = next(batch_iter, None)
            if paths is not None:
                queue.append((paths, [loader.submit(_load, p) for p in paths]))

        submit_next()
        while queue:
            paths, futures = queue.popleft()
            submit_next()
            loaded = [f.result() for f in futures]
            rows: list[dict[str, Any]] = [None] * len(paths)  # type: ignore[list-item]
            good = [i for i, (img, _) in enumerate(loaded) if img is not None]
            for i, (img, reason) in enumerate(loaded):
                if img is None:
                    rows[i] = error_row(paths[i], reason)
            if good:
                prepared = crops.run([loaded[i][0] for i in good])
                batch = np.stack([p.result.crop for p in prepared]).astype(np.float32)
                probs = classify(batch)
                if explainer is not None:
                    from kmel.explain import save_overlay

                    for i, prep, heat in zip(good, prepared, explainer(batch)):
                        save_overlay(Path(explain_dir) / f"{paths[i].stem}_gradcam.png", prep.result.crop, heat)
                for i, prep, prob in zip(good, prepared, probs):
                    pred = int(prob >= threshold)
                    summary.n_ok += 1
                    summary.n_malignant += pred
                    tone = prep.result.skin_tone
                    rows[i] = {
                        "image": paths[i].stem, "path": str(paths[i]), "probability": f"{float(prob):.6f}",
                        "prediction": pred, "label": class_names[pred], "threshold": threshold,
                        "skin_tone_group": tone.group_name, "ita": f"{tone.ita:.2f}",
                        "ita_category": tone.ita_category_name, "crop_mode": prep.result.crop_mode,
                        "box_x0": prep.box[0], "box_y0": prep.box[1], "box_x1": prep.box[2],
                        "box_y1": prep.box[3], "tta": tta, "status": "ok", "error": "",
                    }
            emit(rows)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
