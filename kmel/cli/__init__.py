"""kmel command line: each command parses, builds the config, calls one library function, reports.

Installed as the ``kmel`` console script and as ``python -m kmel``; ``python cli.py`` in a clone runs the same
group. The commands live by stage (``data``, ``train``, ``models``); ``common`` holds what they share, including
the exit-code rule (:func:`kmel.cli.common.exit_code`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kmel.cli.common import (
    run,  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow is imported
)
from kmel.cli.data import build_records_cmd, make_synthetic
from kmel.cli.models import evaluate, export, predict
from kmel.cli.serve import serve
from kmel.cli.train import train

__all__ = ["cli", "main", "version_line"]


def _installed_version(*distributions: str) -> str:
    """Version of the first installed distribution of ``distributions`` (no import of the package)."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def version_line() -> str:
    """kmel's version and the TensorFlow and Keras it runs with."""
    import kmel

    tf = _installed_version("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")
    return f"kmel {kmel.__version__} (TensorFlow {tf}, Keras {_installed_version('keras')}, Python {sys.version.split()[0]})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the versions of kmel, TensorFlow, Keras and Python, then exit.")
def cli() -> None:
    """kmel: fair melanoma detection in dermoscopic images (Keras 3 / TensorFlow).

    Typical run: make-synthetic (or your ISIC download) -> build-records -> train seg -> train cls -> predict
    / evaluate. `demo` does all of it on synthetic data. `tensorboard --logdir runs` shows the trainings.
    """


for command in (make_synthetic, build_records_cmd, train, predict, export, evaluate, serve):
    cli.add_command(command)


@cli.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo makes (data, records, models, runs, reports).")
@click.option("--n-images", default=240, show_default=True, type=click.IntRange(min=16), help="Synthetic labelled images.")
@click.option("--quick", is_flag=True, help="Tiny sizes and one epoch each (a smoke test, not a result).")
@click.option("--quiet", is_flag=True, help="No progress bars (one line per stage and per epoch).")
def demo(out: str, n_images: int, quick: bool, quiet: bool) -> None:
    """Synthetic data end to end: make data, build records, train seg, crops, train cls, predict, evaluate."""

    def body() -> int:
        from kmel.demo import run_demo

        result = run_demo(Path(out), n_images=n_images, quick=quick, progress=not quiet)
        for key, value in result.items():
            click.echo(f"{key}: {value}")
        return 0

    run(body)


def main() -> None:
    """Console-script entry point (``kmel``)."""
    cli()


if __name__ == "__main__":
    main()
