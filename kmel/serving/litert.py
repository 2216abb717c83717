"""TFLite (LiteRT) files of the two exported models, and a runtime that serves them.

``kmel export --format tflite`` converts ``saved_models/segmenter`` and ``saved_models/classifier``
(their ``serve`` signature: float32 images 0–255 in, probabilities out) into
``saved_models/tflite/<model>-<precision>.tflite``:

- ``float32``: the same graph, for phones and for XNNPACK on this CPU;
- ``float16``: weights stored as float16 (half the file), computed in float32 where the hardware has
  no float16 arithmetic;
- ``int8``: weights and activations quantised to int8, calibrated on a representative set drawn from
  the records (train split: segmenter inputs made by :class:`kmel.lesion.crops.CropPipeline`, and the crops
  the exported segmenter gives for them). Inputs and outputs stay float32, so the same code feeds
  every precision; an op without an int8 kernel stays in float.

Each file is checked against its SavedModel on held-out inputs from the val split (the same
preprocessing ``predict`` does): max |SavedModel − TFLite| is recorded per model and precision in
``pipeline.json`` (section ``tflite``) with the file's size, SHA-256 and the SavedModel fingerprint it
was made from, so a retrained model makes its TFLite files stale instead of silently wrong.

The runtime prefers the ``ai_edge_litert`` interpreter (``pip install "kmel[tflite]"``) and falls
back to the one TensorFlow still ships.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kmel import constants as C
from kmel.config import ConfigError
from kmel.serving.runtime import (
    MODELS,
    PRECISIONS,
    SECTION,
    TFLITE_DIR,
    TFLiteModel,
    _check_precision,
    tflite_path,
)

# === Conversion ===


QUANTIZATION = {
    "float32": "none",
    "float16": "float16 weights",
    "full-int8": "int8 weights and activations (calibrated)",
    "dynamic-int8": "int8 weights, activations quantised per call (dynamic range)",
}


def convert_saved_model(saved_model: str | Path, precision: str,
                        representative: np.ndarray | None = None) -> bytes:
    """A SavedModel's ``serve`` signature as a TFLite flatbuffer. ``precision``: ``float32``,
    ``float16``, ``full-int8`` (needs ``representative``, float32 inputs) or ``dynamic-int8``; ``int8``
    means ``full-int8``."""
    import tensorflow as tf

    precision = "full-int8" if precision == "int8" else precision
    if precision not in QUANTIZATION:
        raise ConfigError(f"unknown TFLite precision {precision!r}; known: {', '.join(PRECISIONS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serve"])
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "full-int8":
        if representative is None or not len(representative):
            raise ConfigError("int8 needs a representative set of inputs (drawn from the records)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def samples() -> Iterable[list[np.ndarray]]:
            for x in representative:
                yield [x[None].astype(np.float32)]

        converter.representative_dataset = samples
    return converter.convert()


def xnnpack_refusal(blob: bytes) -> str | None:
    """Why the CPU runtime (XNNPACK) cannot prepare this model, or None when it runs. Checked with
    TensorFlow's interpreter, which raises; a refused model can crash the LiteRT one outright."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            interpreter = tf.lite.Interpreter(model_content=blob, num_threads=1)
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], np.float32))
            interpreter.invoke()
        except (RuntimeError, ValueError) as exc:
            return str(exc).strip()
    return None


def draw_inputs(records_dir: str | Path, split: str, n: int, models_dir: str | Path, pipeline: dict[str, Any],
                workers: int = 0, segment: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``split`` as (segmenter inputs, classifier crops), made exactly as ``predict``
    makes them: :class:`kmel.lesion.crops.CropPipeline` with the exported segmenter. Taken evenly across the
    split's shards (the first records of each). ``segment``: the exported segmenter's function when
    the caller has loaded it already."""
    import cv2

    from kmel.data.records import load_manifest, shard_paths
    from kmel.data.tfrecord import read_records
    from kmel.lesion.crops import CropPipeline, make_segment_fn
    from kmel.serving.runtime import config_from_pipeline

    records_dir = Path(records_dir)
    if not (records_dir / C.MANIFEST).is_file():
        raise FileNotFoundError(
            f"{records_dir} holds no records ({C.MANIFEST} missing): the TFLite export draws its calibration and "
            "parity images from them; pass --records pointing at the folder build-records wrote"
        )
    shards = shard_paths(records_dir, "img", split, load_manifest(records_dir))
    if not shards:
        raise FileNotFoundError(f"{records_dir} has no {split} img- shards to draw TFLite calibration images from")
    per_shard = -(-n // len(shards))
    images: list[np.ndarray] = []
    for shard in shards:
        for i, record in enumerate(read_records([shard])):
            if i >= per_shard or len(images) >= n:
                break
            bgr = cv2.imdecode(np.frombuffer(record[C.F_IMAGE], np.uint8), cv2.IMREAD_COLOR)
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    config = config_from_pipeline(pipeline, models_dir)
    segment = make_segment_fn(models_dir, pipeline)[0] if segment is None else segment  # names the fix if none
    seg_size = int(pipeline["segmenter"]["image_size"])
    with CropPipeline(segment, seg_size, config, workers) as crops:
        pres = [crops.pre(image) for image in images]
        prepared = crops.finish(pres)
    return (np.stack([p.seg_input for p in pres]).astype(np.float32),
            np.stack([p.result.crop for p in prepared]).astype(np.float32))


def export_tflite(
    models_dir: str | Path = "saved_models", records_dir: str | Path | None = "tfrecords",
    precisions: Sequence[str] = PRECISIONS, n_representative: int = 64, n_parity: int = 16,
    progress: bool = True, pipeline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``models_dir/tflite/<model>-<precision>.tflite`` for both models and each precision, each
    checked against its SavedModel on val images of ``records_dir`` (int8 calibrated on train images);
    returns (and stores in ``pipeline.json``) the ``tflite`` section."""
    from kmel.models.pipeline import read_pipeline

    models_dir = Path(models_dir)
    for precision in precisions:
        _check_precision(precision)
    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    if pipeline.get("classifier", {}).get("kind") == "joint":
        raise ConfigError(f"{models_dir} holds a joint model (kmel train joint): its TFLite export is not built; it is "
                          "served by its SavedModel (predict / serve with --runtime tf)")
    for model in MODELS:
        if model not in pipeline or not (models_dir / model / "saved_model.pb").is_file():
            raise FileNotFoundError(f"{models_dir} has no exported {model}: train it first (`kmel train "
                                    f"{'seg' if model == C.SEGMENTER_DIR else 'cls'}`) or pass --models")
    if records_dir is None:
        raise ConfigError("the TFLite export needs records (--records) for its parity check and int8 calibration")
    from kmel.serving.runtime import load_runtime_models

    workers = int(pipeline["segmenter"].get("crops", {}).get("workers", 0) or 0)
    parity_split = "val" if _has_split(records_dir, "val") else "train"
    saved = load_runtime_models(models_dir, pipeline)  # the SavedModels, loaded once for drawing and parity
    held_out = draw_inputs(records_dir, parity_split, n_parity, models_dir, pipeline, workers, saved.segment)
    calibration = draw_inputs(records_dir, "train", n_representative, models_dir, pipeline, workers,
                              saved.segment) if "int8" in precisions else None
    return write_tflite(models_dir, pipeline, precisions, held_out, calibration, parity_split, progress, saved)


def write_tflite(
    models_dir: str | Path, pipeline: dict[str, Any], precisions: Sequence[str],
    held_out: tuple[np.ndarray, np.ndarray], calibration: tuple[np.ndarray, np.ndarray] | None = None,
    parity_split: str = "given", progress: bool = False, saved: Any = None,
) -> dict[str, Any]:
    """Convert, check and record (see :func:`export_tflite`), with the inputs given: ``held_out`` and
    ``calibration`` are (segmenter inputs, classifier crops), float32 0–255; ``saved``: the SavedModels
    as :class:`kmel.serving.runtime.RuntimeModels` when the caller has loaded them."""
    from tqdm.auto import tqdm

    from kmel.serving.export import update_pipeline
    from kmel.serving.runtime import load_runtime_models

    models_dir = Path(models_dir)
    saved = load_runtime_models(models_dir, pipeline) if saved is None else saved
    reference = {C.SEGMENTER_DIR: saved.segment(held_out[0]), C.CLASSIFIER_DIR: saved.classify(held_out[1])}
    section = dict(pipeline.get(SECTION, {}))
    (models_dir / TFLITE_DIR).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(precisions) * len(MODELS), desc="tflite", unit="model", disable=not progress)
    for precision in precisions:
        _check_precision(precision)
        entry: dict[str, Any] = {}
        for i, model in enumerate(MODELS):
            kind = "full-int8" if precision == "int8" else precision
            if kind == "full-int8" and calibration is None:
                raise ConfigError("int8 needs calibration inputs (drawn from the records' train split)")
            blob = convert_saved_model(models_dir / model, kind, calibration[i] if calibration is not None else None)
            refusal = xnnpack_refusal(blob)
            note = ""
            if refusal and kind == "full-int8":
                # Seen with the U-Net segmenters: XNNPACK refuses the fully quantised graph ("failed to
                # prepare"). Weights-only int8 keeps most of the size and speed gain and runs.
                note = f"full-integer int8 refused by XNNPACK ({refusal}); dynamic-range int8 instead"
                kind = "dynamic-int8"
                blob = convert_saved_model(models_dir / model, kind)
                refusal = xnnpack_refusal(blob)
            if refusal:
                raise RuntimeError(f"the {precision} TFLite {model} does not run on this CPU's runtime: {refusal}")
            path = tflite_path(models_dir, model, precision)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            runner = TFLiteModel(path)
            got = np.concatenate([runner(held_out[i][j : j + 8]) for j in range(0, len(held_out[i]), 8)])
            entry[model] = {
                "file": f"{TFLITE_DIR}/{path.name}", "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                "source_fingerprint": pipeline[model]["fingerprint"], "quantization": QUANTIZATION[kind],
                **parity(reference[model], got.reshape(reference[model].shape), model),
                "parity_n": int(len(held_out[i])), "parity_split": parity_split,
                **({"note": note} if note else {}),
            }
            bar.update(1)
        if calibration is not None and precision == "int8":
            entry["calibration_n"] = int(len(calibration[0]))
        section[precision] = entry
    bar.close()
    update_pipeline(models_dir, SECTION, section)
    return section


def parity(reference: np.ndarray, got: np.ndarray, model: str) -> dict[str, float]:
    """How far a TFLite model's outputs are from its SavedModel's: max and mean |difference|; for the
    segmenter also the IoU of the two masks at 0.5 (what the crop is made from)."""
    diff = np.abs(got.astype(np.float64) - reference)
    out = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    if model == C.SEGMENTER_DIR:
        a, b = reference >= 0.5, got >= 0.5
        union = np.logical_or(a, b).sum()
        out["mask_iou"] = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return out


def _has_split(records_dir: str | Path, split: str) -> bool:
    from kmel.data.records import load_manifest, shard_paths

    return bool(shard_paths(records_dir, "img", split, load_manifest(records_dir)))


# === Runtime ===


