"""Frozen dataclass configs, one per stage, loaded from a YAML profile and overridden by flags.

A profile is a YAML file with one mapping per stage (``records``, ``segmenter``, ``crops``,
``classifier``, ``predict``, ``fusion``). ``load_config("cpu-small", {"segmenter.epochs": 3})`` reads the
shipped profile, applies dotted overrides and returns a :class:`Config`. Unknown keys are errors,
so a typo in a user's profile is caught before hours of training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from kmel import constants as C

PROFILE_DIR = Path(__file__).parent / "profiles"


class ConfigError(ValueError):
    """A profile or flag that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class RecordsConfig:
    """How build-records cleans, splits and writes the data."""

    task: str = "malignant"  # malignant | melanoma | keratosis | diagnosis
    # The diagnosis task's classes (softmax outputs, in this order) and those whose probabilities sum to
    # the malignant probability; docs/data.md, "Diagnosis classes", maps every source onto them.
    classes: tuple[str, ...] = C.DIAGNOSIS_CLASSES
    malignant_classes: tuple[str, ...] = C.MALIGNANT_CLASSES
    image_size: int = 512  # long side of img- records, pixels
    seg_size: int = 256  # side of the square seg- records
    shard_size: int = 512  # records per shard
    jpeg_quality: int = 95
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    workers: int = 0  # 0: one per CPU core
    sources: tuple[str, ...] = ()  # restrict to these sources; empty: all found
    # every image of these goes to test (clinical photographs, not dermoscopy: docs/data.md); () to train on them too
    eval_only_sources: tuple[str, ...] = C.EVAL_ONLY_SOURCES
    duplicate_lists: tuple[str, ...] = ()  # extra duplicate-list files; *duplicate*.txt in data dir always read
    max_file_mb: int = 256  # larger image files are refused unread (listed in skipped.csv)


@dataclass(frozen=True)
class SegmenterConfig:
    """U-Net / ResNet encoder segmenter and its training."""

    backbone: str = "resnet34"  # resnet34 | resnet18 | efficientnet_lite0 (lite1, lite2)
    image_size: int = 256
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.2
    batch_size: int = 16
    epochs: int = 30
    steps_per_epoch: int = 0  # 0: one pass over the data
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    tversky_alpha: float = 0.3  # weight of false positives
    tversky_beta: float = 0.7  # weight of false negatives
    reduce_lr_factor: float = 0.5
    reduce_lr_patience: int = 3
    early_stopping_patience: int = 8
    # Epoch at which each unfreezing stage starts: encoder stages trainable from then on
    # ("4" = deepest ResNet stage, "all" = every layer).
    unfreeze: tuple[tuple[int, str], ...] = ((0, "4"), (3, "3"), (6, "all"))
    augment: bool = True
    # How far the sources (archives, clinics) of the training masks are raised towards equal shares of each epoch
    # (0: their natural shares, 1: equal): on the union the ISIC masks, 19 % of them, are otherwise outnumbered
    # by HAM10000's coarser ones (kmel.data.datasets.make_source_balanced_records).
    source_balance: float = 0.0
    weights: str = "none"  # imagenet | none | PATH
    # Base URL (or folder) serving the ImageNet files flat, as MIRROR/NAME; "" = $KMEL_WEIGHTS_MIRROR, else the
    # public URLs. See kmel/models/download.py.
    weights_mirror: str = ""
    seed: int = 42


@dataclass(frozen=True)
class CropsConfig:
    """Lesion crop, hair removal and skin tone (the classification preprocessing)."""

    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    gamma: float = 1.2
    mask_threshold: float = 0.5
    min_area_fraction: float = 0.005  # smaller components are noise
    max_area_fraction: float = 0.90  # larger lesions: use the whole image
    morph_kernel: int = 5
    dilate_fraction: float = 0.02  # dilation, as a fraction of the image side
    margin: float = 0.15  # context around the box, fraction of its side
    hair_kernel: int = 17  # black-hat structuring element, pixels at 512 px
    hair_threshold: int = 10
    inpaint_radius: int = 5
    remove_hair: bool = True
    # Shades-of-Gray colour constancy of the classifier crop (Finlayson & Trezzi 2004; p = 6 in ISIC 2018/2019
    # entries): each channel scaled so the image's Minkowski p-mean is grey. 0: off. The skin tone is always
    # estimated from the original colours.
    colour_constancy_p: float = 0.0
    # CLAHE + gamma (clahe_clip, clahe_tiles, gamma) on the image the segmenter reads when making crops. Off: the
    # segmenter learns on the raw seg records, and on the union test images the enhanced input cost it 0.022 (ISIC)
    # and 0.030 (HAM10000) thresholded Jaccard (bench/seg_input_check.py); a classifier on those crops did not gain
    # at a small budget (ISIC AUC about -0.02, HAM10000 within noise: docs/benchmarks.md). Crops made before this
    # setting existed had it on; their models keep it (see LEGACY_CROPS).
    enhance_segmenter_input: bool = False
    # The segmenter's probability map averaged over the four flips of its input (each flipped back): 4x the
    # segmenter's time in the crop stage and predict. On the union test images the thresholded Jaccard of the masks
    # rose 0.741 -> 0.754 (ISIC) and 0.822 -> 0.830 (HAM10000) (bench/seg_levers.py, docs/benchmarks.md).
    segmenter_flips: bool = False
    skin_border: float = 0.05  # fraction of the image border excluded from skin tone
    skin_min_pixels: int = 200
    batch_size: int = 16
    workers: int = 0


# Crop settings added after models were exported, with the value every crop had before: a pipeline.json or crops
# manifest without the key was made with it (:func:`with_legacy_crops`), and that value leaves a crops folder's name
# and records' identity as they were (:func:`crops_identity`).
LEGACY_CROPS: dict[str, Any] = {"enhance_segmenter_input": True, "segmenter_flips": False}


def with_legacy_crops(crops: Mapping[str, Any]) -> dict[str, Any]:
    """A stored crops section with the settings it predates filled in with the value it was made with."""
    return {**LEGACY_CROPS, **crops}


def crops_identity(crops: Any) -> dict[str, Any]:
    """A crops section (config or stored dict) as it identifies crops: the later settings left out at their legacy
    value, so crops made before they existed keep their folder and still match."""
    plain = dict(crops) if isinstance(crops, Mapping) else to_plain(crops)
    for key, legacy in LEGACY_CROPS.items():
        if plain.get(key, legacy) == legacy:
            plain.pop(key, None)
    return plain


@dataclass(frozen=True)
class ClassifierConfig:
    """EfficientNet or ResNet classifier, balancing, training and threshold choice."""

    # efficientnet_b0 ... efficientnet_b7, efficientnet_lite0 ... lite4, resnet18, resnet34, resnet50, resnet101, resnet152
    backbone: str = "efficientnet_b4"
    image_size: int = 512
    dropout: float = 0.4
    # pool: global average pool -> dropout -> Dense (kmel's own); conv4: the smartphone-photo system's head, four
    # 3x3 conv + BatchNorm + ReLU (32, 64, 128, 128) -> pool -> dropout -> Dense 512 tanh -> Dense (models/classifier.py)
    head: str = "pool"
    # BatchNorm moving-average momentum; 0: Keras' 0.99 with pretrained weights, 0.9 from scratch
    # (from scratch the weights move fast and 0.99 lags behind them for hundreds of steps).
    batchnorm_momentum: float = 0.0
    batch_size: int = 16
    epochs: int = 18
    steps_per_epoch: int = 0
    max_learning_rate: float = 3e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.3  # one-cycle: share of steps spent warming up
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    unfreeze: tuple[tuple[int, str], ...] = ((0, "head"), (2, "top"), (5, "all"))
    # Learning rate of the backbone's layers as a fraction of the head's (1: one rate for all). A new
    # head needs ~1e-3; pretrained layers lose their features at that rate under Adam.
    backbone_lr_scale: float = 1.0
    early_stopping_patience: int = 5
    # Balancing: fraction of malignant samples per epoch (0: keep natural rate) and how far
    # rare skin-tone groups are raised towards the largest (0: not at all, 1: equal counts).
    target_malignant_fraction: float = 0.38
    skin_tone_balance: float = 0.5
    # The diagnosis task's balancing, in place of target_malignant_fraction: class c's share of an epoch is
    # ∝ n_c^(1 − class_balance) (0: natural, 1: every class equal; 0.5, the square root, draws HAM10000's
    # 6,705 nevi and 115 dermatofibromas 7.6 : 1 rather than 58 : 1 or 1 : 1).
    class_balance: float = 0.5
    # How far the sources (archives, clinics) within each (class, skin tone) group are raised towards the
    # largest (0: their natural shares, 1: equal), so a small source is not drowned by a large one.
    source_balance: float = 0.0
    augment: bool = True
    # strong | light | auto (light when fine-tuning pretrained weights, strong from scratch)
    augment_policy: str = "auto"
    threshold_method: str = "f1_group_floor"  # f1_group_floor | f1 | youden | sensitivity
    min_group_recall: float = 0.7
    # Groups whose validation recall f1_group_floor keeps >= min_group_recall: "skin_tone", "source" (the archive
    # or clinic each image came from), or both (every skin tone within every source).
    threshold_groups: tuple[str, ...] = ("skin_tone",)
    target_sensitivity: float = 0.9
    bootstrap: int = 1000
    weights: str = "none"
    weights_mirror: str = ""  # as SegmenterConfig.weights_mirror
    seed: int = 42
    # K > 1: train K members (seeds seed, seed + 1, ...; the same data and recipe) and export one model that
    # averages their probabilities; calibration, threshold, report, Grad-CAM and TFLite work on the average.
    ensemble: int = 1


@dataclass(frozen=True)
class JointConfig:
    """The segmenter and classifier trained end to end (``kmel train joint``, kmel/models/joint.py): the classifier
    sees ``image × (alpha + (1 − alpha) · mask)``. The classifier section gives the classifier, its input size,
    schedule, balancing and threshold rule; the trained segmenter of the models folder is the mask's start."""

    # Brightness kept outside the mask: 0 shows the classifier only what the segmenter marks, 1 ignores the mask.
    alpha: float = 0.25
    # Weight of the segmentation loss (Tversky, the segmenter's) on images that have an expert mask, beside the
    # classifier's loss of weight 1: it keeps the mask a lesion mask. 0: pure attention, the mask free to change.
    mask_loss_weight: float = 0.1
    # Epochs with the segmenter frozen while the new classifier head learns; then both parts train (the segmenter's
    # layers at classifier.backbone_lr_scale of the peak rate, as the classifier's pretrained layers).
    segmenter_warmup_epochs: int = 1


@dataclass(frozen=True)
class PredictConfig:
    """How predict reads its inputs and batches them."""

    batch_size: int = 16
    tta: bool = False
    workers: int = 0
    max_file_mb: int = 256  # larger input files get an error row, unread
    # Memory bounds (see kmel.serving.runner.staged_batches and model_chunk): finished batches waiting for the
    # classifier, and input pixels per model call (4 × 512²: 4 images at 512 px, 20 at 224 px).
    queue_batches: int = 2
    max_batch_pixels: int = 1048576


@dataclass(frozen=True)
class FusionConfig:
    """Image + metadata fusion (``kmel train fusion``): LightGBM over the image score and the records' tabular
    columns, fitted on the validation split with cross-fitting grouped by patient (kmel/training/fusion.py)."""

    folds: int = 5  # cross-fitting folds (each needs a patient with a malignant lesion)
    include: tuple[str, ...] = ()  # only these metadata columns (empty: every usable one)
    exclude: tuple[str, ...] = ()  # never these
    relative: bool = True  # patient-relative features: z-score and rank within the patient, the lesion count
    image_offset: bool = True  # the trees start from the image logit and learn what the metadata adds to it
    threshold_method: str = "f1"  # f1 | youden | sensitivity (target_sensitivity) on the out-of-fold scores
    target_sensitivity: float = 0.9
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    bootstrap: int = 1000  # resamples for the image-vs-fused intervals of the report
    seed: int = 42


@dataclass(frozen=True)
class Config:
    profile: str = "default"
    records: RecordsConfig = field(default_factory=RecordsConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    joint: JointConfig = field(default_factory=JointConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


_SECTIONS = {
    "records": RecordsConfig,
    "segmenter": SegmenterConfig,
    "crops": CropsConfig,
    "classifier": ClassifierConfig,
    "predict": PredictConfig,
    "fusion": FusionConfig,
    "joint": JointConfig,
}


def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to dicts and lists (for YAML / JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(cls: type, name: str, value: Any, default: Any) -> Any:
    """Turn YAML/CLI values into the type of the field's default."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name} must be a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{name} must be true/false, got {value!r}")
        return value
    if isinstance(default, int):
        try:
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{cls.__name__}.{name} must be an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{cls.__name__}.{name} must be a number, got {value!r}") from None
    return str(value)


# The allowed range of each numeric setting, by name (the same name means the same kind of value in
# every section): (lowest, highest, whether the lowest itself is allowed). Checked when a config is
# made, so a wrong value stops a command before any work, naming the key.
_RANGES: dict[str, tuple[float, float, bool]] = {
    **dict.fromkeys(("image_size", "seg_size", "shard_size", "batch_size", "epochs", "max_file_mb", "queue_batches",
                     "max_batch_pixels", "bootstrap", "clahe_tiles", "morph_kernel", "hair_kernel", "inpaint_radius",
                     "skin_min_pixels", "min_data_in_leaf", "ensemble"), (1, float("inf"), True)),
    **dict.fromkeys(("seed", "workers", "steps_per_epoch", "reduce_lr_patience", "early_stopping_patience",
                     "hair_threshold", "weight_decay", "focal_gamma", "margin", "colour_constancy_p",
                     "mask_loss_weight", "segmenter_warmup_epochs"),
                    (0, float("inf"), True)),
    "jpeg_quality": (1, 100, True),
    **dict.fromkeys(("val_fraction", "test_fraction", "dropout", "mask_threshold", "min_area_fraction",
                     "max_area_fraction", "dilate_fraction", "skin_border", "warmup_fraction", "focal_alpha",
                     "label_smoothing", "target_malignant_fraction", "skin_tone_balance", "source_balance", "class_balance",
                     "min_group_recall", "target_sensitivity", "batchnorm_momentum", "tversky_alpha", "tversky_beta",
                     "alpha"),
                    (0, 1, True)),
    **dict.fromkeys(("learning_rate", "max_learning_rate", "gamma", "clahe_clip", "reduce_lr_factor"),
                    (0, float("inf"), False)),
    "backbone_lr_scale": (0, 1, False),
    **dict.fromkeys(("folds", "num_leaves"), (2, float("inf"), True)),
}


def _check_range(cls: type, name: str, value: Any) -> None:
    if name not in _RANGES or isinstance(value, (bool, tuple, str)):
        return
    low, high, closed = _RANGES[name]
    if not (value >= low if closed else value > low) or value > high:
        bound = f"at least {low:g}" if closed else f"above {low:g}"
        bound += f" and at most {high:g}" if high != float("inf") else ""
        raise ConfigError(f"{cls.__name__}.{name} must be {bound}, got {value!r}")


def _make_section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    defaults = cls()
    kwargs = {k: _coerce(cls, k, v, getattr(defaults, k)) for k, v in values.items()}
    for key, value in kwargs.items():
        _check_range(cls, key, value)
    section = cls(**kwargs)
    if cls is RecordsConfig:
        _check_task(section, where)
    if cls is ClassifierConfig and section.head not in C.CLASSIFIER_HEADS:
        raise ConfigError(f"{where}: head must be one of {list(C.CLASSIFIER_HEADS)}, got {section.head!r}")
    return section


def _check_task(rc: RecordsConfig, where: str) -> None:
    """A known task and, for it, a class list kmel can map every source onto."""
    if rc.task not in C.TASKS:
        raise ConfigError(f"{where}: task must be one of {list(C.TASKS)}, got {rc.task!r}")
    classes, malignant = list(rc.classes), list(rc.malignant_classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"{where}: classes needs at least two distinct classes, got {classes}")
    unknown = [c for c in classes if c not in C.DIAGNOSIS_CLASSES]
    if unknown:
        raise ConfigError(f"{where}: unknown class(es) {unknown} in classes; kmel maps sources onto "
                          f"{list(C.DIAGNOSIS_CLASSES)}")
    outside = [c for c in malignant if c not in classes]
    if outside or not malignant:
        raise ConfigError(f"{where}: malignant_classes must be a non-empty subset of classes {classes}, "
                          f"got {malignant}")


def resolve_profile(profile: str) -> Path:
    """A shipped profile name (``reference``, ``cpu-small``, ...) or a path to a YAML file."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist")
        return path
    shipped = PROFILE_DIR / f"{profile}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; shipped profiles: {names}, or give a path to a YAML file")
    return shipped


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_config(profile: str = "cpu-small", overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a profile and apply ``{"section.key": value}`` overrides (``None`` values are ignored)."""
    path = resolve_profile(profile)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a mapping of sections {sorted(_SECTIONS)}")
    name = str(raw.pop("profile", path.stem))
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"profile {path}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"profile {path}: section {section!r} must be a mapping")
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, field_name = key.partition(".")
        if section not in _SECTIONS or not field_name:
            raise ConfigError(f"override {key!r} must look like 'section.key' with section in {sorted(_SECTIONS)}")
        raw.setdefault(section, {})[field_name] = value
    sections = {s: _make_section(cls, raw.get(s, {}), f"{path.name}:{s}") for s, cls in _SECTIONS.items()}
    return Config(profile=name, **sections)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to read configs written next to outputs)."""
    sections = {name: _make_section(cls, dict(data.get(name, {})), name) for name, cls in _SECTIONS.items()}
    return Config(profile=str(data.get("profile", "default")), **sections)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (``.yaml``) or JSON (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))
    return path
