"""`kmel serve`: the exported models behind a web page and an HTTP API (:mod:`kmel.serving.app`)."""

from __future__ import annotations

import click

from kmel.cli.common import POSITIVE, TFLITE_PRECISION_OPTION, model_check_options, run
from kmel.config import ConfigError
from kmel.models.integrity import ModelChecks


def _check_port(host: str, port: int) -> None:
    """A port already taken is a one-line usage error before anything loads (not uvicorn's traceback)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
                              "or --host") from None


@click.command("serve")
@click.option("--models", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder with segmenter/, classifier/ and pipeline.json (and report/ for the model card).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--token", default=None, envvar="KMEL_SERVE_TOKEN", show_envvar=True,
              help="Every /api call must send 'Authorization: Bearer TOKEN' (required off loopback). Prefer the "
                   "environment variable: a command line is visible to other users of the machine.")
@click.option("--runtime", type=click.Choice(["tf", "tflite"]), default="tf", show_default=True,
              help="tf: the SavedModels (Grad-CAM available); tflite: the files of `kmel export --format tflite`.")
@TFLITE_PRECISION_OPTION
@click.option("--workers", type=POSITIVE, default=None,
              help="Threads that decode and crop images [pipeline: predict.workers; 0 there: one per core]. The "
                   "models themselves run in one thread that batches the waiting requests.")
@click.option("--tta", is_flag=True, help="Average the classifier over flips (4x its time; noted in each entry).")
@click.option("--max-request-mb", type=click.FloatRange(min=0.001), default=32, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--max-megapixels", type=click.FloatRange(min=0.001), default=50, show_default=True,
              help="Largest image (width x height, read from its header before decoding); larger ones get 413.")
@click.option("--max-files", type=POSITIVE, default=64, show_default=True, help="Most files in one request (413).")
@click.option("--max-concurrent", type=POSITIVE, default=32, show_default=True,
              help="Most requests in flight (queued or running); more get 429 with Retry-After.")
@click.option("--keep-uploads", default=None, type=click.Path(file_okay=False),
              help="Save every uploaded file in this folder. Without it no upload is ever written to disk.")
@model_check_options
@click.option("--log-level", type=click.Choice(["warning", "info", "debug"]), default="info", show_default=True,
              help="info: one line per request (counts and timings; never file names or contents).")
def serve(models: str, host: str, port: int, token: str | None, runtime: str, tflite_precision: str,
          workers: int | None, tta: bool, max_request_mb: float, max_megapixels: float, max_files: int,
          max_concurrent: int, keep_uploads: str | None, no_verify: bool, trust_model: bool, log_level: str) -> None:
    """Serve the models: a web page at / and an HTTP API under /api (OpenAPI schema at /openapi.json).

    Loads the models once, then answers POST /api/predict (images as multipart files: `curl -F
    files=@a.jpg http://127.0.0.1:8000/api/predict`), GET /api/model (the model card) and GET
    /api/health. Listens on 127.0.0.1 unless --host says otherwise; any other address needs --token.
    Uploads are kept in memory only (unless --keep-uploads). Research use only: not a medical device.
    """

    def body() -> int:
        import logging

        import uvicorn

        from kmel.serving.app import check_bind, make_app

        check_bind(host, token)
        _check_port(host, port)
        app = make_app(models, runtime=runtime, tflite_precision=tflite_precision, token=token, workers=workers,
                       tta=tta, max_request_mb=max_request_mb, max_megapixels=max_megapixels, max_files=max_files,
                       max_concurrent=max_concurrent, keep_uploads=keep_uploads,
                       checks=ModelChecks(not no_verify, trust_model))
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"kmel serve: http://{shown}:{port}/ (models {models}, runtime {runtime}"
                   f"{', token required for /api' if token else ''}); research use only, not a medical device")
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level=log_level, server_header=False)
        return 0

    run(body)
