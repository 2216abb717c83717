"""A static file server on 127.0.0.1 and a Keras cache cut off from the internet, for the weights-download tests.

``offline_keras_cache`` points ``KERAS_HOME`` at a temporary folder and the named public download bases of
:mod:`kmel.models.weights.resolve` at a loopback port where nothing listens, so nothing can leave this machine
even if the mirror setting broke. ``WeightsServer`` serves the files a test gives it (the ``weights_server``
fixture in conftest.py starts and stops one).
"""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import keras


class WeightsServer:
    """Static files by name, each optionally with a lying Content-Length; every GET is recorded."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int | None]] = {}
        self.requests: list[tuple[str, str]] = []  # (file name, User-Agent)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("User-Agent", "")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, declared = server.files[name]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                self.wfile.write(body)  # HTTP/1.0: the connection closes after this, short or not

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, name: str, body: bytes, declared_length: int | None = None) -> None:
        self.files[name] = (body, declared_length)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url() -> str:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def offline_keras_cache(tmp_path: Path, monkeypatch, **bases: str) -> Path:
    """Keras cache in ``tmp_path``; no mirror from the environment; each named download base of
    :mod:`kmel.models.weights.resolve` (``EFFICIENTNET_BASE_URL="keras-applications/"``, ...) replaced by
    the same path on a dead loopback port. Returns the cache's models folder."""
    from kmel.models.weights import resolve as kw
    from kmel.models.weights.download import MIRROR_ENV

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    dead = dead_url()
    for name, path in bases.items():
        assert hasattr(kw, name), name
        monkeypatch.setattr(kw, name, f"{dead}/{path}")
    return tmp_path / "keras" / "models"


def listing(folder: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def legacy_h5(model: keras.Model, path: Path) -> bytes:
    """The weights as Keras' published ``*_notop.h5`` files hold them (the legacy HDF5 layout)."""
    import h5py
    from keras.src.legacy.saving import (
        legacy_h5_format,  # test only: Keras 3 saves only .weights.h5 publicly
    )

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path.read_bytes()
