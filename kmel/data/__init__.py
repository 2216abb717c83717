"""Data: the official metadata read as published and cleaned into one table (``formats/`` one module per
source family), images decoded safely, prepared and written as sharded TFRecords, read back by tf.data with
augmentation, and the synthetic data of the demo."""

from kmel import lazy_exports

_EXPORTS = {
    "load_metadata": "kmel.data.metadata",
    "find_images": "kmel.data.metadata",
    "find_masks": "kmel.data.metadata",
    "apply_task": "kmel.data.metadata",
    "diagnosis_class": "kmel.data.diagnosis",
    "diagnosis_classes": "kmel.data.diagnosis",
    "split_table": "kmel.data.metadata",
    "drop_content_duplicates": "kmel.data.metadata",
    "TASKS": "kmel.data.metadata",
    "DataError": "kmel.data.records",
    "build_records": "kmel.data.records",
    "load_manifest": "kmel.data.records",
    "shard_paths": "kmel.data.records",
    "format_counts": "kmel.data.records",
    "records_problems": "kmel.data.records",
    "make_dataset": "kmel.data.datasets",
    "make_record_dataset": "kmel.data.datasets",
    "decode_image": "kmel.data.datasets",
    "decode_mask": "kmel.data.datasets",
    "balance_weights": "kmel.data.datasets",
    "class_draw_shares": "kmel.data.datasets",
    "count_records": "kmel.data.datasets",
    "steps_per_epoch": "kmel.data.datasets",
    "ImageReadError": "kmel.data.images",
    "load_image": "kmel.data.images",
    "load_image_bytes": "kmel.data.images",
    "load_image_reduced": "kmel.data.images",
    "walk_images": "kmel.data.images",
    "list_images": "kmel.data.images",
    "check_file": "kmel.data.images",
    "encode_jpeg": "kmel.data.images",
    "resize_long_side": "kmel.data.images",
    "pad_to_square": "kmel.data.images",
    "flip_views": "kmel.data.images",
    "make_example": "kmel.data.tfrecord",
    "parse_example": "kmel.data.tfrecord",
    "read_records": "kmel.data.tfrecord",
    "write_shard": "kmel.data.tfrecord",
    "make_cls_augmenter": "kmel.data.augment",
    "make_seg_augmenter": "kmel.data.augment",
    "make_synthetic_dataset": "kmel.data.synthetic",
    "make_prediction_folder": "kmel.data.synthetic",
    "make_isic2024_dataset": "kmel.data.synthetic_isic2024",
    "make_lesion_image": "kmel.data.synthetic_images",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
