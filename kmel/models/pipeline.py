"""The exported pipeline as a reader sees it: ``pipeline.json``, the SavedModels' ``serve`` endpoints as
NumPy functions, and the classifier's calibration (the temperature pipeline.json records). Everything
that loads exported models (crops, predict, evaluate, serve) reads them through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from kmel import constants as C


def load_serving(path: str | Path) -> Any:
    """Load an exported model's ``serve`` function (no Keras objects needed)."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise FileNotFoundError(
            f"{path} is not an exported kmel model (no saved_model.pb): train it with `python cli.py train ...`"
        )
    loaded = tf.saved_model.load(str(path))
    return loaded


def signature_fn(loaded: Any, name: str = "serve") -> Callable[[np.ndarray], np.ndarray]:
    """A loaded SavedModel's ``name`` endpoint as a NumPy function: float32 batch in, its one output
    out. The function holds ``loaded``, whose variables the endpoint reads, so it stays alive with it."""
    fn = loaded.signatures[name]

    def call(batch: np.ndarray) -> np.ndarray:
        return next(iter(fn(tf.constant(batch, tf.float32)).values())).numpy()

    call.loaded = loaded  # type: ignore[attr-defined]
    return call


def read_pipeline(models_dir: str | Path) -> dict[str, Any]:
    path = Path(models_dir) / C.PIPELINE_JSON
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probabilities: Any, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens over-confident scores; monotone, so rankings and AUC are unchanged."""
    z = _logit(np.asarray(probabilities, dtype=np.float64)) / float(temperature)
    return 1.0 / (1.0 + np.exp(-z))
