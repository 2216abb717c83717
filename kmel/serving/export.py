"""SavedModel export and ``pipeline.json``: what ``predict`` and ``evaluate`` load.

Each model is exported with one ``serve`` signature taking float32 images 0–255 of a fixed size.
``pipeline.json`` beside them holds sizes, threshold, task, settings, metrics and fingerprints, so
serving needs no training code and no ``.keras`` file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

import kmel
from kmel import constants as C
from kmel.models.integrity import FORMAT_VERSION, saved_model_fingerprint  # noqa: F401 (re-exported)
from kmel.models.pipeline import read_pipeline


def export_serving(
    model: keras.Model, path: str | Path, image_size: int, gradcam_layer: str | Sequence[str] | None = None
) -> Path:
    """Write ``model`` as a SavedModel with a ``serve`` endpoint (float32 [N, S, S, 3], 0–255).

    With ``gradcam_layer``, a second ``gradcam`` endpoint returns Grad-CAM maps of that layer (of a diagnosis
    model's most probable class; an ensemble names each member's layer and gets the mean of their maps), and for a
    model with several outputs ``gradcam_class`` takes a class index too.
    The folder is written under a temporary name and swapped in when complete.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")]
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=lambda images: model(images, training=False), input_signature=spec)
    if gradcam_layer is not None:
        from kmel.models.gradcam import make_gradcam_graph_fn

        archive.add_endpoint(name="gradcam", fn=make_gradcam_graph_fn(model, gradcam_layer), input_signature=spec)
        if model.outputs[0].shape[-1] != 1:
            archive.add_endpoint(name="gradcam_class", fn=make_gradcam_graph_fn(model, gradcam_layer, by_class=True),
                                 input_signature=[*spec, tf.TensorSpec([], tf.int32, name="class_index")])
    # Gradients of the endpoints are never asked of a loaded export (Grad-CAM's are inside its own graph), so the
    # custom gradients of the ops are not traced and saved: 5-10 s less per EfficientNet-B0 export.
    archive.write_out(str(tmp), options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
                      verbose=False)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def update_pipeline(models_dir: str | Path, section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Set ``pipeline[section] = values`` atomically and return the whole pipeline."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    data = read_pipeline(models_dir)
    data["kmel_version"] = kmel.__version__
    data["format_version"] = FORMAT_VERSION
    data[section] = dict(values)
    tmp = models_dir / (C.PIPELINE_JSON + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, models_dir / C.PIPELINE_JSON)
    return data


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
