"""Names defined once: TFRecord feature keys, table columns, file names, group labels."""

from __future__ import annotations

# === Table columns (metadata.csv written by build-records) ===
COL_IMAGE_ID = "image_id"
COL_SOURCE = "source"  # isic2016 | isic2017 | isic2018 | isic2019 | isic2020 | ham10000 | fitzpatrick17k | custom
COL_YEAR = "year"  # newest-wins rule for ids seen in several sources
COL_DIAGNOSIS = "diagnosis"  # upper-case code: MEL, NV, BCC, AK, SCC, BKL, DF, VASC, SK, UNK, ...
COL_TARGET = "target"  # 0/1 for the binary tasks, the class index for the diagnosis task
COL_MALIGNANT = "malignant"  # 0/1/NaN, task-independent
COL_MELANOMA = "melanoma"
COL_KERATOSIS = "keratosis"
COL_PATIENT = "patient_id"
COL_LESION = "lesion_id"
COL_AGE = "age"
COL_SEX = "sex"
COL_SITE = "site"
COL_FITZPATRICK = "fitzpatrick"  # Fitzpatrick17k annotation, -1 when unknown
COL_IMAGE_PATH = "image_path"
COL_MASK_PATH = "mask_path"
COL_SHA256 = "sha256"
COL_SKIN_TONE = "skin_tone"  # index into SKIN_TONE_GROUPS
COL_SKIN_TONE_NAME = "skin_tone_name"
COL_ITA = "ita"
COL_ITA_CATEGORY = "ita_category"  # index into ITA_CATEGORIES
COL_SPLIT = "split"

SPLITS = ("train", "val", "test")

# === Tasks and diagnosis classes ===
BINARY_TASKS = ("malignant", "melanoma", "keratosis")
TASKS = (*BINARY_TASKS, "diagnosis")
# The eight diagnoses of the ISIC 2019 challenge (its ninth, UNK, is no class to learn): what kmel maps every
# source's diagnosis onto (kmel/data/diagnosis.py), and the diagnosis task's default class list.
DIAGNOSIS_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
# Classes whose probabilities add up to the diagnosis model's malignant probability (the binary task's MEL/BCC/AK/SCC).
MALIGNANT_CLASSES = ("MEL", "BCC", "AK", "SCC")
# Classifier heads on the backbone's last stage (classifier.head; kmel/models/classifier.py): kmel's pooled Dense, or
# the smartphone-photo system's four conv + BatchNorm layers before it (profile smartphone-resnet50).
CLASSIFIER_HEADS = ("pool", "conv4")

# === Skin tone ===
# The reference pipeline's five groups from mean brightness (0-255) of the skin around the lesion.
SKIN_TONE_GROUPS = ("very_light", "light", "medium", "tan", "dark")
SKIN_TONE_EDGES = (96.0, 128.0, 160.0, 192.0)
# Chardon et al. ITA scale, from lightest to darkest; boundaries in degrees.
ITA_CATEGORIES = ("very_light", "light", "intermediate", "tan", "brown", "dark")
ITA_EDGES = (55.0, 41.0, 28.0, 10.0, -30.0)

# === Lesion crops ===
CROP_MODES = ("lesion", "full_image_no_mask", "full_image_too_large")

# === TFRecord features: one spec for img-, seg- and crop- records ===
# Every record carries every key; fields a kind does not use hold their default.
F_IMAGE = "image"  # encoded JPEG (img-, crop-) or PNG (seg-) bytes
F_MASK = "mask"  # encoded PNG bytes, b"" when absent
F_IMAGE_ID = "image_id"
F_SOURCE = "source"
F_DIAGNOSIS = "diagnosis"
F_PATIENT = "patient_id"
F_TARGET = "target"  # int64, -1 when unknown
F_SKIN_TONE = "skin_tone"  # int64 group index
F_ITA = "ita"  # float
F_ITA_CATEGORY = "ita_category"  # int64
F_HEIGHT = "height"  # original image height before resizing
F_WIDTH = "width"
F_CROP_MODE = "crop_mode"  # int64 index into CROP_MODES, -1 for non-crop records
F_BOX = "box"  # 4 x int64: x0, y0, x1, y1 in original pixels, zeros for non-crop records

# === Files ===
MANIFEST = "manifest.json"
METADATA_CSV = "metadata.csv"
SKIPPED_CSV = "skipped.csv"
PIPELINE_JSON = "pipeline.json"
CONFIG_YAML = "config.yaml"
SEGMENTER_DIR = "segmenter"
CLASSIFIER_DIR = "classifier"
SEGMENTER_KERAS = "segmenter.keras"
CLASSIFIER_KERAS = "classifier.keras"
# train joint: the segment-then-classify model's outputs (its serve endpoint's keys) and the crop mode predict writes
JOINT_PROBABILITY = "probability"
JOINT_MASK = "mask"
JOINT_CROP_MODE = "joint_no_crop"

# Decoded (Pillow; GIF and WebP: first frame), in order of preference when one id has several files.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Sources of clinical photographs (not dermoscopy): every image goes to test unless a profile says otherwise
# (records.eval_only_sources; docs/data.md, "Clinical photographs").
EVAL_ONLY_SOURCES = ("ddi", "pad_ufes20")
# Files holding many images, one encoded image per dataset (ISIC 2024's train-image.hdf5): kmel/data/hdf5.py.
HDF5_SUFFIXES = (".hdf5", ".h5")
# Named like images but not decoded: such a file gets an error naming its format, never a silent skip
# (the file's first bytes name the format when they can: a JPEG saved as .heic is decoded).
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL",
    ".jp2": "JPEG 2000", ".j2k": "JPEG 2000", ".jpf": "JPEG 2000", ".jpx": "JPEG 2000",
    ".dcm": "DICOM", ".dicom": "DICOM", ".psd": "Photoshop PSD", ".svg": "SVG",
}
