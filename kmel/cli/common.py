"""What every kmel command shares: the exit-code rule, one-line user errors, the profile and model-check options.

Exit codes, the same for every command: 0 every input that could be used was used (harmless leftovers are
reported, not errors); 1 some file could not be read or a mask could not be used (or, with ``--strict``,
anything was reported); 2 usage or configuration error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from kmel.config import ConfigError, list_profiles, load_config  # noqa: E402

PROFILE_HELP = (f"Settings profile: a shipped name ({', '.join(list_profiles())}) or a path to your own YAML. "
                "Flags override it; the resolved config is written next to every output.")


def user_errors() -> tuple[type[BaseException], ...]:
    from kmel.data.records import DataError
    from kmel.models.fusion import FusionError
    from kmel.models.weights.download import WeightsError

    return ConfigError, FileNotFoundError, DataError, WeightsError, FusionError


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)

STRICT_HELP = ("Exit 1 when anything is reported (orphan masks, rows without an image, CSVs not "
               "recognised...), not only when a file could not be read.")


def exit_code(n_errors: int, n_notes: int, strict: bool) -> int:
    """The one rule: 1 when a file or mask could not be used (or anything was reported, strict), else 0."""
    return 1 if n_errors or (strict and n_notes) else 0


def run(fn: Callable[[], int | None]) -> None:
    """Run a command body; user errors print one clear line and exit 2 (no stack trace)."""
    try:
        code = fn() or 0
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, user_errors()):
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        raise
    sys.exit(code)


def config_for(profile: str, overrides: dict[str, Any], records: str | None = None):
    """Profile + flags; the records section comes from the record set when one is given."""
    from kmel.config import config_from_dict

    config = load_config(profile, overrides)
    if records is not None:
        from kmel.data.records import load_manifest

        manifest = load_manifest(records)
        data = config.to_dict()
        data["records"] = manifest["config"]["records"]
        config = config_from_dict(data)
    return config


OUTPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def inputs_and_out(paths: tuple[str, ...], out: str | None) -> tuple[list[str], str]:
    """``INPUT... OUT`` or ``INPUT... --out OUT``; a last argument taken as OUT must look like one."""
    if out is not None:
        inputs = list(paths)
    elif len(paths) >= 2 and Path(paths[-1]).suffix.lower() in OUTPUT_SUFFIXES:
        inputs, out = list(paths[:-1]), paths[-1]
    else:
        raise click.UsageError("give the output file last (a .csv or .jsonl name) or with --out OUT "
                               "(the last argument is never taken as an output unless it ends in .csv or .jsonl)")
    if not inputs:
        raise click.UsageError("no input: give image files, folders, or - to read paths from standard input")
    return inputs, out


def model_check_options(fn: Callable) -> Callable:
    """--no-verify and --trust-model: what is checked before exported models run (kmel.models.integrity)."""
    fn = click.option("--trust-model", is_flag=True,
                      help="Load SavedModels whose graphs use operations kmel's own models never use (file, "
                           "network or process operations): only for models whose origin you trust.")(fn)
    return click.option("--no-verify", is_flag=True,
                        help="Skip comparing the model files' fingerprints and SHA-256s with pipeline.json "
                             "(and the check that segmenter and classifier come from one training).")(fn)


TFLITE_PRECISION_OPTION = click.option(
    "--tflite-precision", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True,
    help="Which TFLite files --runtime tflite uses (int8: quantised, fastest, least exact; pipeline.json's "
         "tflite section states each one's parity).")
