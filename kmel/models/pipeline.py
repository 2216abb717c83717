"""The exported pipeline as a reader sees it: ``pipeline.json``, the SavedModels' ``serve`` endpoints as
NumPy functions, and the classifier's calibration (the temperature pipeline.json records). Everything
that loads exported models (crops, predict, evaluate, serve) reads them through here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kmel import constants as C
from kmel.models.heads import ClassifierHead
from kmel.models.integrity import (
    DEFAULT_CHECKS,
    ModelChecks,
    ModelIntegrityError,
    check_fingerprint,
    check_graph,
    check_pipeline,
)
from kmel.models.scores import logit


class _NoCustomGradientNote(logging.Filter):
    """TensorFlow warns, for each function of a SavedModel saved without its ops' custom gradients, that asking for
    a gradient would fail. kmel saves its exports so on purpose (kmel/serving/export.py) and never asks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "with ops with unsaved custom gradients" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoCustomGradientNote())


def load_serving(path: str | Path, checks: ModelChecks = DEFAULT_CHECKS, fingerprint: str | None = None) -> Any:
    """Load an exported model's ``serve`` function (no Keras objects needed), after the checks of
    :mod:`kmel.models.integrity`: its graph uses only kmel's operations (unless ``checks.trust_model``),
    and its weights are the ``fingerprint`` pipeline.json recorded (when given, with ``checks.verify``)."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise FileNotFoundError(
            f"{path} is not an exported kmel model (no saved_model.pb): train it with `python cli.py train ...`"
        )
    check_graph(path, checks)
    check_fingerprint(path, fingerprint, checks)
    try:
        return tf.saved_model.load(str(path))
    except Exception as exc:  # truncated or bit-flipped variables, a graph this TensorFlow cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelIntegrityError(f"{path} cannot be loaded ({type(exc).__name__}: {first[:200]}): the model files "
                                  "are damaged or incomplete; copy the models folder again or retrain") from None


def signature_fn(loaded: Any, name: str = "serve") -> Callable[[np.ndarray], np.ndarray]:
    """A loaded SavedModel's ``name`` endpoint as a NumPy function: float32 batch in, its one output
    out. The function holds ``loaded``, whose variables the endpoint reads, so it stays alive with it."""
    fn = loaded.signatures[name]

    def call(batch: np.ndarray) -> np.ndarray:
        return next(iter(fn(tf.constant(batch, tf.float32)).values())).numpy()

    call.loaded = loaded  # type: ignore[attr-defined]
    return call


def read_pipeline(models_dir: str | Path) -> dict[str, Any]:
    """The contents of ``models_dir/pipeline.json`` ({} when there is none); a damaged file or one newer
    than this kmel reads is refused, naming it."""
    path = Path(models_dir) / C.PIPELINE_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{path} is damaged ({exc}): copy the models folder again, or retrain "
                                  "(`kmel train seg` then `kmel train cls`)") from None
    if not isinstance(data, dict):
        raise ModelIntegrityError(f"{path} is not a kmel pipeline.json (not a JSON object)")
    check_pipeline(models_dir, data, ModelChecks(verify=False))  # the format version; mixing is checked at load
    return data


def source_threshold(classifier: dict[str, Any], source: str | None = None) -> float:
    """The decision threshold of images from ``source`` (``predict --source``): the one ``train cls`` chose on that
    source's validation images alone (``threshold_by_source``; names match without regard to case), or with no
    source the one chosen on every validation image. An unknown source is refused, naming those it knows."""
    if source is None:
        return float(classifier["threshold"])
    table = {name.lower(): entry for name, entry in (classifier.get("threshold_by_source") or {}).items()}
    if source.lower() not in table:
        from kmel.config import ConfigError

        known = ", ".join(sorted(table)) or ("none (trained before kmel chose them, or no source had "
                                             "enough validation images)")
        raise ConfigError(f"--source {source!r}: this model has no threshold of its own for that source; sources "
                          f"with one: {known}. Omit --source to use the threshold chosen on all validation images")
    return float(table[source.lower()]["threshold"])


def apply_temperature(probabilities: Any, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens over-confident scores; monotone, so rankings and AUC are unchanged."""
    z = logit(probabilities) / float(temperature)
    return 1.0 / (1.0 + np.exp(-z))


def apply_class_temperature(probabilities: Any, temperature: float) -> np.ndarray:
    """softmax(log p / T) row by row: temperature scaling of a softmax head's [N, K] class probabilities."""
    z = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrate_outputs(head: ClassifierHead, outputs: Any, temperature: float) -> tuple[np.ndarray | None, np.ndarray]:
    """(calibrated [N, K] class probabilities, or None for a yes/no head; calibrated [N] malignant probability)
    of a classifier's raw outputs. A diagnosis head's temperature scales its classes, and the malignant
    probability is the sum of the calibrated malignant classes."""
    if head.multiclass:
        classes = np.asarray(outputs, dtype=np.float64).reshape(-1, head.n_outputs)
        if temperature != 1.0:
            classes = apply_class_temperature(classes, temperature)
        return classes, head.malignant_probability(classes)
    probability = head.malignant_probability(outputs)
    return None, apply_temperature(probability, temperature) if temperature != 1.0 else probability
