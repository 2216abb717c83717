"""Tiny hand-written exported models (a brightness threshold for the segmenter, mean brightness for the
classifier, a flat Grad-CAM), saved in a second, with a pipeline.json that describes them as a training
would: the runner, predict and the model checks are tested with these; trained models are tested in
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from tests.tiny import tiny_config

SEG, CLS = 32, 32


def write_handmade_models(out: Path, scale: float = 1.0, extra: str | None = None) -> Path:
    """Segmenter + classifier SavedModels and pipeline.json in ``out``. ``scale`` multiplies the classifier's
    score (a variable, so another ``scale`` is another fingerprint); ``extra``: ``"write_file"`` (the
    classifier also writes ``out/written.txt`` when called) or ``"nan"`` (it returns NaN for bright images)."""
    import tensorflow as tf

    from kmel.models.integrity import saved_model_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    written = str(out / "written.txt")

    class Segmenter(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SEG, SEG, 3], tf.float32)])
        def serve(self, images):
            dark = tf.reduce_mean(images, axis=-1, keepdims=True) < 110.0
            return {"probability": tf.cast(dark, tf.float32)}

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(scale, dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, CLS, CLS, 3], tf.float32)])
        def serve(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2, 3])[:, None]
            if extra == "write_file":
                tf.io.write_file(written, "the model ran")
            score = (1.0 - mean / 255.0) * self.scale
            if extra == "nan":
                score = tf.where(mean > 150.0, tf.math.log(-mean), score)
            return {"probability": score}

        @tf.function(input_signature=[tf.TensorSpec([None, CLS, CLS, 3], tf.float32)])
        def gradcam(self, images):
            return {"heat": tf.ones_like(images[..., 0]) * 0.5}

    seg, cls = Segmenter(), Classifier()
    tf.saved_model.save(seg, str(out / "segmenter"), signatures={"serve": seg.serve})
    tf.saved_model.save(cls, str(out / "classifier"), signatures={"serve": cls.serve, "gradcam": cls.gradcam})
    config = tiny_config(**{"segmenter.image_size": SEG, "classifier.image_size": CLS}).to_dict()
    segmenter = saved_model_fingerprint(out / "segmenter")
    pipeline = {
        "format_version": 1,
        "segmenter": {"image_size": SEG, "records": config["records"], "crops": config["crops"],
                      "config": config["segmenter"], "fingerprint": segmenter},
        "classifier": {"config": config["classifier"], "threshold": 0.5, "class_names": ["benign", "malignant"],
                       "fingerprint": saved_model_fingerprint(out / "classifier"),
                       "segmenter_fingerprint": segmenter},
    }
    (out / "pipeline.json").write_text(json.dumps(pipeline))
    return out


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 64), background: int = 200) -> Path:
    """A light image with one dark disc (the handmade segmenter finds it)."""
    rng = np.random.default_rng(seed)
    image = np.full((*size, 3), background, np.uint8)
    cv2.circle(image, (size[1] // 2, size[0] // 2), size[0] // 4, tuple(int(v) for v in rng.integers(20, 90, 3)), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix if path.suffix in (".jpg", ".png") else ".png", image)
    path.write_bytes(buf.tobytes())
    return path


def write_untrained_segmenter(models: Path, config) -> None:
    """An exported, seeded, untrained segmenter: enough for crop records (no training needed)."""
    import keras

    from kmel import constants as C
    from kmel.config import to_plain
    from kmel.models.segmenter import build_segmenter
    from kmel.serving.export import (
        export_serving,
        saved_model_fingerprint,
        update_pipeline,
    )

    keras.utils.set_random_seed(0)
    export_serving(build_segmenter(config.segmenter), models / C.SEGMENTER_DIR, config.segmenter.image_size)
    update_pipeline(models, "segmenter", {
        "image_size": config.segmenter.image_size, "fingerprint": saved_model_fingerprint(models / C.SEGMENTER_DIR),
        "config": to_plain(config.segmenter), "records": to_plain(config.records), "crops": to_plain(config.crops)})


HANDMADE_CLASSES = ("MEL", "NV", "BCC")


def write_handmade_diagnosis_models(out: Path, class_draw_share: dict[str, float] | None = None) -> Path:
    """:func:`write_handmade_models` with a diagnosis classifier over :data:`HANDMADE_CLASSES` instead: for darkness
    s in [0, 1], p = (0.4 + 0.2 s, 0.35 − 0.1 s, 0.25 − 0.1 s), so MEL is always the most probable class, but with
    draw shares (0.7, 0.2, 0.1) p / q always names BCC. Its Grad-CAM maps are flat at (class index + 1) / 10:
    ``gradcam`` of the most probable class (0.1), ``gradcam_class`` of the class asked for."""
    import tensorflow as tf

    from kmel.models.integrity import saved_model_fingerprint

    write_handmade_models(out)

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, CLS, CLS, 3], tf.float32)])
        def serve(self, images):
            s = 1.0 - tf.reduce_mean(images, axis=[1, 2, 3])[:, None] / 255.0
            return {"probabilities": tf.concat([0.4 + 0.2 * s, 0.35 - 0.1 * s, 0.25 - 0.1 * s], axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None, CLS, CLS, 3], tf.float32)])
        def gradcam(self, images):
            return {"heat": tf.ones_like(images[..., 0]) * 0.1}

        @tf.function(input_signature=[tf.TensorSpec([None, CLS, CLS, 3], tf.float32, name="images"),
                                      tf.TensorSpec([], tf.int32, name="class_index")])
        def gradcam_class(self, images, class_index):
            return {"heat": tf.ones_like(images[..., 0]) * tf.cast(class_index + 1, tf.float32) / 10.0}

    cls = Classifier()
    shutil.rmtree(out / "classifier")
    tf.saved_model.save(cls, str(out / "classifier"),
                        signatures={"serve": cls.serve, "gradcam": cls.gradcam, "gradcam_class": cls.gradcam_class})
    pipeline = json.loads((out / "pipeline.json").read_text())
    pipeline["classifier"].update(task="diagnosis", class_names=list(HANDMADE_CLASSES), malignant_classes=["MEL", "BCC"],
                                  fingerprint=saved_model_fingerprint(out / "classifier"))
    if class_draw_share is not None:
        pipeline["classifier"]["class_draw_share"] = class_draw_share
    (out / "pipeline.json").write_text(json.dumps(pipeline))
    return out
