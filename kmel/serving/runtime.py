"""Runtimes that serve the two exported models as NumPy functions: the SavedModels (``tf``) or the TFLite
files of ``kmel export --format tflite`` (``tflite``, through the LiteRT interpreter, TensorFlow's own
``tf.lite`` one as the fallback), and the training config the exported models carry in pipeline.json.
Below both ``predict`` and the TFLite export, which check their files with it."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmel import constants as C
from kmel.config import Config, ConfigError, config_from_dict, with_legacy_crops
from kmel.models.integrity import (
    DEFAULT_CHECKS,
    ModelChecks,
    ModelIntegrityError,
    check_file_sha256,
    check_pipeline,
)
from kmel.models.pipeline import load_serving, read_pipeline, signature_fn


def config_from_pipeline(pipeline: dict[str, Any], models_dir: str | Path = "saved_models") -> Config:
    """The config the exported models were trained with (preprocessing must match it)."""
    for part in ("segmenter", "classifier"):
        if part not in pipeline:
            raise FileNotFoundError(
                f"{Path(models_dir) / C.PIPELINE_JSON} has no {part}: train it first (`kmel train "
                f"{'seg' if part == 'segmenter' else 'cls'}`) or pass --models pointing at exported models"
            )
    seg, cls = pipeline["segmenter"], pipeline["classifier"]
    # The crop settings the classifier's crops were made with (recorded since kmel 0.1.x); before, the
    # segmenter's, which train cls used unless its profile said otherwise.
    # a joint model reads whole images as its own records held them; a crop classifier, the segmenter's records
    records = cls["records"] if cls.get("kind") == "joint" and "records" in cls else seg["records"]
    return config_from_dict({"records": records, "crops": with_legacy_crops(cls.get("crops", seg["crops"])),
                             "segmenter": seg["config"], "classifier": cls["config"]})


def load_pipeline_config(models_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The training config and the contents of ``models_dir/pipeline.json``."""
    pipeline = read_pipeline(models_dir)
    return config_from_pipeline(pipeline, models_dir), pipeline


RUNTIMES = ("tf", "tflite")


def _chunked(fn: Callable[[np.ndarray], np.ndarray], size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` called on at most ``size`` images at a time (the results concatenated)."""

    def run(batch: np.ndarray) -> np.ndarray:
        if len(batch) <= size:
            return fn(batch)
        return np.concatenate([fn(batch[i : i + size]) for i in range(0, len(batch), size)])

    return run


def model_chunk(image_size: int, max_batch_pixels: int) -> int:
    """Images per model call so that one call sees at most ``max_batch_pixels`` input pixels (at least one):
    the activations of a call grow with its pixels, so this bounds the models' working memory."""
    return max(1, max_batch_pixels // (image_size * image_size))


@dataclass(frozen=True)
class RuntimeModels:
    """The exported segmenter and classifier as plain functions, whichever runtime serves them.

    ``segment``: float32 [N, S, S, 3] 0–255 → [N, S, S] lesion probabilities. ``classify``: float32
    [N, C, C, 3] 0–255 → [N, K] probabilities, uncalibrated (K = 1 for a yes/no model, the classes for a
    diagnosis model). Both split a batch into calls of at most
    ``max_batch_pixels`` input pixels.
    """

    runtime: str
    precision: str
    seg_size: int
    cls_size: int
    segment: Callable[[np.ndarray], np.ndarray]
    classify: Callable[[np.ndarray], np.ndarray]
    classifier_savedmodel: Any = None  # the loaded SavedModel (tf runtime): its gradcam endpoint explains
    # A joint model's (``train joint``) whole call: float32 [N, C, C, 3] 0–255 → ([N, K] uncalibrated
    # probabilities, [N, C, C] lesion mask); None for the crop pipeline (then ``segment`` is the segmenter's).
    joint: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


def load_runtime_models(
    models_dir: str | Path, pipeline: dict[str, Any] | None = None, runtime: str = "tf",
    tflite_precision: str = "float32", max_batch_pixels: int | None = None, threads: int | None = None,
    checks: ModelChecks = DEFAULT_CHECKS,
) -> RuntimeModels:
    """Load the two exported models for ``runtime``: ``tf`` (the SavedModels) or ``tflite`` (the files
    ``kmel export --format tflite`` wrote, of ``tflite_precision``). ``pipeline``: the contents of
    pipeline.json when the caller has read it already. ``checks``: what is verified before anything
    runs (:mod:`kmel.models.integrity`: fingerprints and SHA-256s, one training, the graph allow-list)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    models_dir = Path(models_dir)
    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    config = config_from_pipeline(pipeline, models_dir)
    check_pipeline(models_dir, pipeline, checks)
    seg_size = int(pipeline["segmenter"]["image_size"])
    cls_size = config.classifier.image_size
    pixels = config.predict.max_batch_pixels if max_batch_pixels is None else max_batch_pixels
    if pipeline["classifier"].get("kind") == "joint":
        if runtime != "tf":
            raise ConfigError("a joint model (kmel train joint) is served by its SavedModel only: use --runtime tf "
                              "(it has no TFLite export)")
        return _load_joint(models_dir, pipeline, cls_size, pixels, checks)
    if runtime == "tflite":
        from kmel.serving.runtime import load_tflite

        seg = load_tflite(models_dir, C.SEGMENTER_DIR, tflite_precision, pipeline, threads, checks)
        cls = load_tflite(models_dir, C.CLASSIFIER_DIR, tflite_precision, pipeline, threads, checks)
        return RuntimeModels(
            "tflite", tflite_precision, seg_size, cls_size,
            _chunked(lambda x: seg(x)[..., 0], model_chunk(seg_size, pixels)),
            _chunked(lambda x: cls(x).reshape(len(x), -1), model_chunk(cls_size, pixels)),
        )
    from kmel.lesion.crops import make_segment_fn

    segment, _ = make_segment_fn(models_dir, pipeline, checks)
    loaded = load_serving(models_dir / C.CLASSIFIER_DIR, checks, pipeline["classifier"].get("fingerprint"))
    cls_serve = signature_fn(loaded)
    return RuntimeModels("tf", "float32", seg_size, cls_size, _chunked(segment, model_chunk(seg_size, pixels)),
                         _chunked(lambda x: cls_serve(x).reshape(len(x), -1), model_chunk(cls_size, pixels)), loaded)


def _load_joint(models_dir: Path, pipeline: dict[str, Any], size: int, pixels: int,
                checks: ModelChecks) -> RuntimeModels:
    """A joint model's SavedModel: ``classify`` its probability, ``joint`` probability and mask; no segmenter."""
    import tensorflow as tf

    loaded = load_serving(models_dir / C.CLASSIFIER_DIR, checks, pipeline["classifier"].get("fingerprint"))
    serve = loaded.signatures["serve"]

    def call(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = serve(tf.constant(batch, tf.float32))
        return out[C.JOINT_PROBABILITY].numpy().reshape(len(batch), -1), out[C.JOINT_MASK].numpy()[..., 0]

    def joint(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunk = model_chunk(size, pixels)
        parts = [call(batch[i : i + chunk]) for i in range(0, len(batch), chunk)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([m for _, m in parts])

    def unavailable(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("a joint model has no separate segmenter: the crop pipeline does not run")

    return RuntimeModels("tf", "float32", size, size, unavailable, lambda x: joint(x)[0], loaded, joint)


PRECISIONS = ("float32", "float16", "int8")


MODELS = (C.SEGMENTER_DIR, C.CLASSIFIER_DIR)


TFLITE_DIR = "tflite"


SECTION = "tflite"


def tflite_path(models_dir: str | Path, model: str, precision: str) -> Path:
    return Path(models_dir) / TFLITE_DIR / f"{model}-{precision}.tflite"


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TFLite precision {precision!r}; known: {', '.join(PRECISIONS)}")


def tflite_status(models_dir: str | Path, precision: str, pipeline: dict[str, Any] | None = None) -> str:
    """``ok`` when both TFLite files of ``precision`` exist and were made from the current SavedModels;
    otherwise what is wrong, naming the command that fixes it."""
    _check_precision(precision)
    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    fix = f"run `kmel export --format tflite --precision {precision} --models {models_dir}`"
    entry = pipeline.get(SECTION, {}).get(precision)
    if not entry:
        return f"no {precision} TFLite files in {models_dir}: {fix}"
    for model in MODELS:
        path = Path(models_dir) / entry[model]["file"]
        if not path.is_file():
            return f"{path} is missing: {fix}"
        if entry[model]["source_fingerprint"] != pipeline.get(model, {}).get("fingerprint"):
            return f"{path} was made from an earlier {model} (the model was retrained since): {fix}"
    return "ok"


def load_tflite(models_dir: str | Path, model: str, precision: str, pipeline: dict[str, Any] | None = None,
                threads: int | None = None, checks: ModelChecks = DEFAULT_CHECKS) -> TFLiteModel:
    """``model``'s TFLite file of ``precision``, refused (naming the fix) when the files are missing or
    older than the SavedModels (:func:`tflite_status`), or (``checks.verify``) when its SHA-256 is not
    the one the export recorded."""
    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    status = tflite_status(models_dir, precision, pipeline)
    if status != "ok":
        raise FileNotFoundError(status)
    path = tflite_path(models_dir, model, precision)
    check_file_sha256(path, pipeline[SECTION][precision][model].get("sha256"), checks)
    return TFLiteModel(path, threads)


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated": it is the fallback
            return tf.lite.Interpreter


class TFLiteModel:
    """One TFLite model as ``fn(float32 batch) -> float32 outputs``, any batch size (the interpreter is
    resized when it changes). Calls are serialised: one interpreter runs one batch at a time."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: run `kmel export --format tflite`")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._interpreter = _interpreter_class()(model_path=str(self.path), num_threads=threads or os.cpu_count())
        except (ValueError, RuntimeError) as exc:  # not a TFLite flatbuffer, or one the interpreter rejects
            raise ModelIntegrityError(f"{self.path} is not a TFLite model this runtime can read "
                                      f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}): "
                                      "export it again with `kmel export --format tflite`") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_shape = tuple(int(v) for v in self._input["shape_signature"])
        self._batch = -1
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if batch.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"{self.path.name} takes {self.input_shape[1:]} inputs, got {batch.shape[1:]}")
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output["index"]).copy()
