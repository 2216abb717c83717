"""Image + metadata fusion, the applying side: gradient-boosted trees over the image model's score and the
patient's tabular data (kmel/training/fusion.py fits them).

Every winning ISIC 2024 solution stacked the image model's score with trees on the published metadata and on
"ugly duckling" features: each measurement relative to the same patient's other lesions. A :class:`FusionSpec`
says which columns become which features and holds the categorical encoding, so training and serving build
the same matrix (:func:`make_fusion_features`). A :class:`FusionModel` is saved as one JSON file holding the
LightGBM booster as text: nothing is unpickled when a model is loaded.

Patient-relative features use the lesions of the same patient present in the table given: score a patient's
lesions together (one lesion alone gets the single-lesion values, z-score 0 and rank 0.5).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.models.scores import logit, sigmoid


class FusionError(ValueError):
    """A fusion model or its input that cannot be used; the message names the file or column and the fix."""


FUSION_JSON = "fusion.json"
FORMAT = "kmel-fusion"
FORMAT_VERSION = 2  # 2: the image logit is the trees' starting score (``image_offset``); 1 read as without it
IMAGE_LOGIT = "image_logit"
PATIENT_COUNT = "patient_n_lesions"
Z_SUFFIX, RANK_SUFFIX = "_pz", "_prank"
SCORE_CLIP = 1e-6
MAX_CATEGORIES = 50  # text columns with more distinct values are ids or free text, not categories
NUMERIC_SHARE = 0.95  # a column is numeric when this share of its values read as numbers (the rest become NaN)
BOOLEAN_TEXT = {"true": 1.0, "false": 0.0}
# Never features: ids, labels and what is derived from them, split and paths, and kmel's per-image bookkeeping.
# The skin tone estimates (and the Fitzpatrick annotation) are the fairness report's groups, not inputs. The raw
# ISIC 2024 table's train-only columns describe the pathology result (docs on kmel/data/formats/isic2024.py), and
# PAD-UFES-20's ``biopsed`` is true for every cancer there: each names the label. Where an image was taken
# (``source``, ISIC 2024's ``attribution`` — the clinic — and ``height`` / ``width``) is left out too: a model
# meant for other hospitals must not learn one hospital's share of melanomas.
NOT_FEATURES = frozenset({
    C.COL_IMAGE_ID, "base_id", C.COL_SOURCE, C.COL_YEAR, C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA,
    C.COL_KERATOSIS, C.COL_TARGET, C.COL_SPLIT, C.COL_IMAGE_PATH, C.COL_MASK_PATH, C.COL_SHA256, "height", "width",
    "has_mask", C.COL_LESION, C.COL_PATIENT, C.COL_FITZPATRICK, "fitzpatrick_group", C.COL_SKIN_TONE,
    C.COL_SKIN_TONE_NAME, C.COL_ITA, C.COL_ITA_CATEGORY, "brightness", "skin_pixels", "drop_reason", "crop_mode",
    "isic_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_thick_mm", "mel_mitotic_index",
    "tbp_lv_dnn_lesion_confidence", "copyright_license", "biopsed", "attribution",
})
# LightGBM keeps feature names space-separated in its model text and refuses JSON's special characters.
_BAD_NAME = re.compile(r"[\s\",:\[\]{}]")


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _text(values: pd.Series) -> pd.Series:
    """Values as stripped strings; None where missing or empty."""
    out = values.astype(object).map(lambda v: None if _is_missing(v) else str(v).strip() or None)
    return out.astype(object)


def _numbers(values: pd.Series) -> pd.Series:
    """Values as floats: numbers as they are, "True"/"False" text as 1/0, anything else (and ±inf) NaN."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        out = pd.to_numeric(values, errors="coerce").astype(np.float64)
    else:
        text = _text(values)
        flags = text.map(lambda v: BOOLEAN_TEXT.get(v.lower()) if isinstance(v, str) else None).astype(np.float64)
        out = flags.fillna(pd.to_numeric(text, errors="coerce").astype(np.float64))
    return out.replace([np.inf, -np.inf], np.nan)


def _feature_names(numeric: Sequence[str], categorical: Sequence[str], relative: bool) -> tuple[str, ...]:
    base = (IMAGE_LOGIT, *numeric)
    names = [*base, *categorical]
    if relative:
        names += [f"{n}{suffix}" for n in base for suffix in (Z_SUFFIX, RANK_SUFFIX)] + [PATIENT_COUNT]
    return tuple(names)


@dataclass(frozen=True)
class FusionSpec:
    """Which table columns a fusion model reads and how: the matrix layout shared by fitting and serving.

    ``features``: the model's columns in order (image logit, numeric columns, categorical codes, then the
    patient-relative ones); ``numeric``: source columns read as numbers; ``categorical``: (column, its
    categories in code order); ``relative``: patient-relative features on; ``patient_column``: who is a patient.
    """

    features: tuple[str, ...]
    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    relative: bool = True
    patient_column: str = C.COL_PATIENT

    def __post_init__(self) -> None:
        want = _feature_names(self.numeric, [c for c, _ in self.categorical], self.relative)
        if tuple(self.features) != want:
            raise FusionError("fusion spec: its features do not follow from its numeric and categorical columns "
                             "(make specs with make_fusion_spec)")

    @property
    def columns(self) -> tuple[str, ...]:
        """The table columns the features are made from."""
        return (*self.numeric, *(c for c, _ in self.categorical))

    def missing_columns(self, columns: Iterable[str]) -> tuple[str, ...]:
        """The spec's columns absent from ``columns`` (they become NaN features: worth a warning)."""
        have = set(columns)
        return tuple(c for c in self.columns if c not in have)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "numeric": list(self.numeric),
                "categorical": {c: list(cats) for c, cats in self.categorical}, "relative": self.relative,
                "patient_column": self.patient_column}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionSpec:
        return cls(features=tuple(data["features"]), numeric=tuple(data["numeric"]),
                   categorical=tuple((c, tuple(cats)) for c, cats in data["categorical"].items()),
                   relative=bool(data["relative"]), patient_column=str(data["patient_column"]))


def make_fusion_spec(
    table: pd.DataFrame, include: Sequence[str] | None = None, exclude: Sequence[str] = (), relative: bool = True,
) -> FusionSpec:
    """Pick the fusion features from a training table.

    Candidates are ``include`` (when given) or every column, less :data:`NOT_FEATURES` and ``exclude``. A column
    mostly of numbers (or "True"/"False" text) is numeric; other text with at most :data:`MAX_CATEGORIES` values
    is categorical, its sorted values the encoding. Left out: all-missing columns and constant ones (one value,
    never missing: no tree can split on them), longer text, and names LightGBM cannot carry (spaces, JSON
    punctuation). An ``include`` name that is absent, a label or id, or unusable is an error.
    """
    if include is not None:
        named = [c for c in include if c in NOT_FEATURES or c not in table.columns or _BAD_NAME.search(c)]
        if named:
            raise FusionError(f"fusion features {named}: absent from the table, an id/label/bookkeeping column, or a "
                             "name with spaces or JSON punctuation; include only measurement columns")
    candidates = [c for c in (include if include is not None else table.columns)
                  if c not in NOT_FEATURES and c not in set(exclude) and not _BAD_NAME.search(str(c))]
    numeric, categorical, unusable = [], [], []
    for col in candidates:
        values = table[col]
        present = int(values.notna().sum())
        if present == 0 or (present == len(values) and values.nunique() <= 1):
            continue
        numbers = _numbers(values)
        if numbers.notna().sum() >= NUMERIC_SHARE * present:
            numeric.append(col)
            continue
        cats = sorted(set(_text(values).dropna()))
        if len(cats) <= MAX_CATEGORIES:
            categorical.append((col, tuple(cats)))
        else:
            unusable.append(col)
    if include is not None and unusable:
        raise FusionError(f"fusion features {unusable}: text with more than {MAX_CATEGORIES} values, not a category")
    return FusionSpec(features=_feature_names(numeric, [c for c, _ in categorical], relative),
                      numeric=tuple(numeric), categorical=tuple(categorical), relative=relative)


def patient_groups(table: pd.DataFrame, column: str = C.COL_PATIENT) -> np.ndarray:
    """An integer per row naming its patient; rows without a patient id (or without the column) are their own."""
    n = len(table)
    if column not in table.columns:
        return np.arange(n)
    codes, _ = pd.factorize(_text(table[column]), use_na_sentinel=True)
    alone = codes < 0
    codes[alone] = codes.max(initial=-1) + 1 + np.arange(int(alone.sum()))
    return codes


def _relative(values: pd.DataFrame, groups: np.ndarray) -> dict[str, pd.Series]:
    """Per column: z-score and mid-rank percentile within the patient (0 and 0.5 for one lesion or no spread)."""
    g = values.groupby(groups)
    mean, std = g.transform("mean"), g.transform("std", ddof=0)
    flat = g.transform("max") == g.transform("min")
    z = ((values - mean) / std.where(~flat, 1.0)).where(~flat, 0.0).where(values.notna())
    rank = (g.rank(method="average") - 0.5) / g.transform("count")
    out = {}
    for col in values.columns:
        out[f"{col}{Z_SUFFIX}"], out[f"{col}{RANK_SUFFIX}"] = z[col], rank[col]
    return out


def make_fusion_features(table: pd.DataFrame, image_score: Any, spec: FusionSpec) -> pd.DataFrame:
    """The fusion matrix: columns exactly ``spec.features``, float64, one row per table row.

    ``image_score``: the image model's malignant probability per row (as a logit, clipped to [1e-6, 1 − 1e-6]).
    Numeric columns read as numbers (text in them becomes NaN); categoricals as their code in the spec's list
    (compared without regard to case), unknown or missing values NaN; a column the spec needs but the table lacks is all NaN
    (:meth:`FusionSpec.missing_columns` names them).
    """
    index, table = table.index, table.reset_index(drop=True)  # positional inside: an index may repeat labels
    score = np.asarray(image_score, dtype=np.float64).reshape(-1)
    if score.size != len(table):
        raise FusionError(f"fusion: {score.size} image scores for {len(table)} table rows")
    base = pd.DataFrame({IMAGE_LOGIT: logit(score, SCORE_CLIP)}, index=table.index)
    for col in spec.numeric:
        base[col] = _numbers(table[col]) if col in table.columns else np.nan
    columns: dict[str, Any] = dict(base.items())
    for col, cats in spec.categorical:
        codes = {c.casefold(): float(i) for i, c in enumerate(cats)}  # "Male" in a user's table is "male"
        text = _text(table[col]) if col in table.columns else pd.Series(None, index=table.index, dtype=object)
        columns[col] = text.map(lambda v: codes.get(v.casefold()) if isinstance(v, str) else None).astype(np.float64)
    if spec.relative:
        groups = patient_groups(table, spec.patient_column)
        columns.update(_relative(base, groups))
        columns[PATIENT_COUNT] = pd.Series(np.bincount(groups)[groups].astype(np.float64), index=table.index)
    out = pd.DataFrame(columns, index=table.index)[list(spec.features)].astype(np.float64)
    out.index = index
    return out


@dataclass(frozen=True)
class FusionModel:
    """A fitted fusion: the spec, the LightGBM booster as text, its calibration and decision threshold.

    ``image_offset``: the trees start from the image model's logit and add to it (boosting from the image score:
    with no trees, the fused score is the image score), so the fused logit is image logit + the booster's sum;
    ``temperature`` divides that logit; ``threshold`` applies to the calibrated probability;
    ``image_fingerprint`` names the image model whose scores it was fitted on (its SavedModel fingerprint);
    ``metrics`` are the out-of-fold validation figures of the fit.
    """

    spec: FusionSpec
    booster_text: str = field(repr=False)
    n_trees: int
    threshold: float
    temperature: float
    image_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    image_offset: bool = True

    @cached_property
    def booster(self) -> Any:
        import lightgbm as lgb

        return lgb.Booster(model_str=self.booster_text)

    def predict(self, table: pd.DataFrame, image_score: Any) -> np.ndarray:
        """Calibrated malignant probability per row of ``table`` (image scores in the same order)."""
        features = make_fusion_features(table, image_score, self.spec)
        raw = np.asarray(self.booster.predict(features.to_numpy(np.float64), raw_score=True), dtype=np.float64)
        if self.image_offset:
            raw = raw + features[IMAGE_LOGIT].to_numpy(np.float64)
        return sigmoid(raw / self.temperature)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/fusion.json`` (written whole, then renamed into place); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": self.spec.to_dict(),
                "n_trees": self.n_trees, "threshold": self.threshold, "temperature": self.temperature,
                "image_fingerprint": self.image_fingerprint, "image_offset": self.image_offset,
                "importance_gain": fusion_importance(self),
                "metrics": self.metrics, "booster": self.booster_text}
        path = folder / FUSION_JSON
        partial = path.with_name(FUSION_JSON + ".partial")
        partial.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
        os.replace(partial, path)
        return path


def fusion_importance(model: FusionModel) -> dict[str, float]:
    """Each feature's share of the booster's total split gain (summing to 1; all 0 for a booster without splits)."""
    gain = np.asarray(model.booster.feature_importance(importance_type="gain"), dtype=np.float64)
    total = gain.sum()
    shares = gain / total if total > 0 else np.zeros_like(gain)
    return {name: float(s) for name, s in zip(model.spec.features, shares)}


def load_fusion(folder: str | Path, image_fingerprint: str | None = None) -> FusionModel:
    """Read ``folder/fusion.json`` (no pickle: the booster is rebuilt from its text).

    Refused with a one-line ``ValueError``: another format or version, a feature list that disagrees with its own
    booster's, and, when ``image_fingerprint`` is given, a fusion fitted on another image model's scores.
    """
    import lightgbm as lgb

    path = Path(folder) / FUSION_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FusionError(f"{path} is not valid JSON ({exc}): fit and save the fusion again") from None
    got = (data.get("format"), data.get("format_version")) if isinstance(data, dict) else type(data).__name__
    if not (isinstance(got, tuple) and got[0] == FORMAT and got[1] in (1, FORMAT_VERSION)):
        raise FusionError(f"{path} is {got}, this kmel reads ({FORMAT!r}, 1 or {FORMAT_VERSION}): refit the fusion with "
                         "this kmel (kmel.training.fusion.fit_fusion)")
    try:
        spec = FusionSpec.from_dict(data["spec"])
        model = FusionModel(spec=spec, booster_text=data["booster"], n_trees=int(data["n_trees"]),
                            threshold=float(data["threshold"]), temperature=float(data["temperature"]),
                            image_fingerprint=str(data["image_fingerprint"]), metrics=dict(data.get("metrics", {})),
                            image_offset=bool(data.get("image_offset", False)) if got[1] >= 2 else False)
        booster = model.booster  # parsed once here, kept for predict
    except (KeyError, TypeError, ValueError, lgb.basic.LightGBMError) as exc:
        raise FusionError(f"{path}: {str(exc).splitlines()[0]}; the file was edited or is damaged: fit and save the "
                         "fusion again") from None
    if tuple(booster.feature_name()) != spec.features:
        raise FusionError(f"{path}: its feature list disagrees with its booster's feature names (the file was edited "
                         "or mixed): fit and save the fusion again")
    if booster.num_trees() != model.n_trees:
        raise FusionError(f"{path}: n_trees {model.n_trees} but its booster has {booster.num_trees()} trees (the file "
                         "was edited or mixed): fit and save the fusion again")
    if image_fingerprint is not None and model.image_fingerprint != image_fingerprint:
        raise FusionError(f"{path} was fitted on the scores of image model {model.image_fingerprint or '(unnamed)'!r}, "
                         f"not {image_fingerprint!r}: refit the fusion on this image model's validation scores")
    return model


FUSION_DIR = "fusion"


def fusion_path(models_dir: str | Path) -> Path:
    """Where ``kmel train fusion`` puts the fusion model of a models folder."""
    return Path(models_dir) / FUSION_DIR / FUSION_JSON


def load_models_fusion(models_dir: str | Path, pipeline: dict[str, Any], verify: bool = True) -> FusionModel | None:
    """The fusion model of a models folder, or None when it has none (no ``fusion`` entry in pipeline.json).

    Refused (``ValueError`` naming the fix): fusion.json missing, or (``verify``) not the file pipeline.json
    recorded (SHA-256), or fitted on the scores of another classifier than the one in the folder (retrained
    since: run ``kmel train fusion`` again).
    """
    entry = pipeline.get("fusion")
    if not entry:
        return None
    path = fusion_path(models_dir)
    if not path.is_file():
        raise FusionError(f"{Path(models_dir) / 'pipeline.json'} lists a fusion model but {path} is missing: run "
                         "`kmel train fusion` again, or copy the whole models folder")
    if verify and entry.get("sha256"):
        import hashlib

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise FusionError(f"{path} is not the fusion model pipeline.json records (SHA-256 {digest[:12]}…, "
                             f"recorded {entry['sha256'][:12]}…): run `kmel train fusion` again")
    fingerprint = pipeline.get("classifier", {}).get("fingerprint")
    return load_fusion(path.parent, image_fingerprint=fingerprint if verify else None)
