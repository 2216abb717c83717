"""The lesion stage between segmenter and classifier: mask cleaning, the crop, hair removal and skin tone
(``lesion``), and the crop records and the :class:`CropPipeline` that training and ``predict`` share (``crops``)."""

from kmel import lazy_exports

_EXPORTS = {
    "CropResult": "kmel.lesion.lesion",
    "SkinTone": "kmel.lesion.lesion",
    "clean_mask": "kmel.lesion.lesion",
    "crop_box": "kmel.lesion.lesion",
    "enhance_for_segmentation": "kmel.lesion.lesion",
    "estimate_skin_tone": "kmel.lesion.lesion",
    "hair_mask": "kmel.lesion.lesion",
    "ita_angle": "kmel.lesion.lesion",
    "model_free_lesion_mask": "kmel.lesion.lesion",
    "prepare_crop": "kmel.lesion.lesion",
    "remove_hair": "kmel.lesion.lesion",
    "CropPipeline": "kmel.lesion.crops",
    "PreparedCrop": "kmel.lesion.crops",
    "build_crop_records": "kmel.lesion.crops",
    "crops_dir_for": "kmel.lesion.crops",
    "ensure_crop_records": "kmel.lesion.crops",
    "make_segment_fn": "kmel.lesion.crops",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
