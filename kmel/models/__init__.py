"""Model builders: the U-Net segmenter (ResNet18/34 or EfficientNet-Lite0–2 encoder, shared scSE decoder), the
EfficientNet or ResNet classifier, Grad-CAM graphs, pretrained weights (``weights/``) and the reader of exported models
(``pipeline``)."""

from kmel import lazy_exports

_EXPORTS = {
    "FusionSpec": "kmel.models.fusion",
    "FusionModel": "kmel.models.fusion",
    "make_fusion_spec": "kmel.models.fusion",
    "make_fusion_features": "kmel.models.fusion",
    "load_fusion": "kmel.models.fusion",
    "fusion_importance": "kmel.models.fusion",
    "logit": "kmel.models.scores",
    "sigmoid": "kmel.models.scores",
    "BACKBONES": "kmel.models.classifier",
    "classifier_last_conv": "kmel.models.classifier",
    "CaffePreprocessing": "kmel.models.resnet_backbones",
    "build_classifier": "kmel.models.classifier",
    "set_trainable_blocks": "kmel.models.classifier",
    "build_segmenter": "kmel.models.segmenter",
    "encoder_stage_layers": "kmel.models.segmenter",
    "layer_stage": "kmel.models.segmenter",
    "load_encoder_weights": "kmel.models.segmenter",
    "set_trainable_stages": "kmel.models.segmenter",
    "ENCODER_SKIPS": "kmel.models.resnet_unet",
    "apply_basic_block": "kmel.models.resnet_unet",
    "apply_scse": "kmel.models.unet_decoder",
    "apply_unet_decoder": "kmel.models.unet_decoder",
    "EfficientNetLite": "kmel.models.efficientnet_lite",
    "make_gradcam_graph_fn": "kmel.models.gradcam",
    "ModelChecks": "kmel.models.integrity",
    "ModelIntegrityError": "kmel.models.integrity",
    "check_graph": "kmel.models.integrity",
    "saved_model_fingerprint": "kmel.models.integrity",
    "apply_temperature": "kmel.models.pipeline",
    "apply_class_temperature": "kmel.models.pipeline",
    "calibrate_outputs": "kmel.models.pipeline",
    "ClassifierHead": "kmel.models.heads",
    "head_from_entry": "kmel.models.heads",
    "head_from_manifest": "kmel.models.heads",
    "load_serving": "kmel.models.pipeline",
    "read_pipeline": "kmel.models.pipeline",
    "signature_fn": "kmel.models.pipeline",
    "WeightsError": "kmel.models.weights",
    "convert_torchvision_resnet": "kmel.models.weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
