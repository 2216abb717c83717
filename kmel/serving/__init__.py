"""Serving: the :class:`Predictor` over the exported models, their runtimes (SavedModel, TFLite), the file
runner behind ``predict``, SavedModel export, TFLite conversion and Grad-CAM explanations."""

from kmel import lazy_exports

_EXPORTS = {
    "Prediction": "kmel.serving.predictor",
    "Predictor": "kmel.serving.predictor",
    "RUNTIMES": "kmel.serving.runtime",
    "PRECISIONS": "kmel.serving.runtime",
    "RuntimeModels": "kmel.serving.runtime",
    "TFLiteModel": "kmel.serving.runtime",
    "config_from_pipeline": "kmel.serving.runtime",
    "load_pipeline_config": "kmel.serving.runtime",
    "load_runtime_models": "kmel.serving.runtime",
    "load_tflite": "kmel.serving.runtime",
    "tflite_status": "kmel.serving.runtime",
    "predict_files": "kmel.serving.runner",
    "predict_folder": "kmel.serving.runner",
    "collect_inputs": "kmel.serving.runner",
    "export_serving": "kmel.serving.export",
    "saved_model_fingerprint": "kmel.models.integrity",
    "update_pipeline": "kmel.serving.export",
    "export_tflite": "kmel.serving.litert",
    "make_gradcam_fn": "kmel.serving.explain",
    "overlay": "kmel.serving.explain",
    "save_overlay": "kmel.serving.explain",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
