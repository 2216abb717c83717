"""A training's work in progress, kept apart from the models it may replace.

Everything a run writes while it trains (its Keras backup for resuming, the history CSV, the best epoch's
weights) and, at the end, its new model files (``.keras``, SavedModel, config, report) go to
``<models>/.run-<name>/``. Only when the run is complete are they moved over the previous ones, one
rename each, and pipeline.json updated; a run that fails or is killed leaves the models folder as it was.

``run.json`` in the run folder records the settings the run started with (the model's section of the
config, the data's fingerprint, the precision). Resuming an interrupted run with other settings would
train with the old ones while pipeline.json records the new: it is refused, naming the keys, unless the
user restarts (``--restart``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from kmel.config import ConfigError

RUN_SETTINGS = "run.json"
# An ensemble's finished members wait in the run folder as <ENSEMBLE_MEMBER><k>.keras (kmel/training/train.py).
ENSEMBLE_MEMBER = "member-"


def run_folder(models_dir: str | Path, name: str) -> Path:
    return Path(models_dir) / f".run-{name}"


def backup_folder(work: str | Path, name: str) -> Path:
    """Where Keras' BackupAndRestore keeps the interrupted run's state (its presence means: resume)."""
    return Path(work) / f".backup-{name}"


def start_run(models_dir: str | Path, name: str, settings: Mapping[str, Any], restart: bool = False) -> Path:
    """The run folder of ``name`` (``segmenter`` / ``classifier``): the interrupted run's, to resume, when
    its settings are ``settings``; otherwise a fresh, empty one. A resume with other settings is refused."""
    work = run_folder(models_dir, name)
    settings = json.loads(json.dumps(dict(settings), default=str))  # as stored: tuples are lists
    if restart:
        shutil.rmtree(work, ignore_errors=True)
    # Interrupted: a Keras backup (of the model, or of an ensemble's member) or a finished ensemble member is there.
    if work.is_dir() and (any(work.glob(f"{backup_folder(work, name).name}*"))
                          or any(work.glob(f"{ENSEMBLE_MEMBER}*.keras"))):
        try:
            before = json.loads((work / RUN_SETTINGS).read_text())
        except (OSError, json.JSONDecodeError):
            before = {}
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if differ:
            changes = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in differ[:8])
            raise ConfigError(
                f"an interrupted {name} run in {work} was started with other settings ({changes}). Rerun with the "
                "same settings to resume it, or pass --restart to start afresh (its finished epochs are dropped)")
        return work
    shutil.rmtree(work, ignore_errors=True)  # a failed run's leftovers (never the models beside it)
    work.mkdir(parents=True)
    (work / RUN_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True))
    return work


def commit_run(work: str | Path, models_dir: str | Path, names: Sequence[str]) -> None:
    """Move the finished run's ``names`` (files or folders) over the previous ones in ``models_dir``."""
    work, models_dir = Path(work), Path(models_dir)
    for name in names:
        source, target = work / name, models_dir / name
        if not source.exists():
            continue
        if target.is_dir():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)


def read_history(folder: str | Path, name: str) -> list[dict[str, Any]]:
    """The rows of ``<name>_history.csv`` in ``folder`` ([] when it is missing or empty: a run killed, or
    a disk that filled, before its first epoch ended)."""
    import pandas as pd

    path = Path(folder) / f"{name}_history.csv"
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        return json.loads(pd.read_csv(path).to_json(orient="records"))
    except pd.errors.EmptyDataError:
        return []
