"""Fetch a weights file once, verify it, and keep it: urllib only, atomic, never a partial file left behind.

:func:`fetch_verified` returns ``dest`` at once when it already exists and passes the check. Otherwise
it downloads into a temporary file in ``dest``'s folder (``.NAME.*.part``), counts the bytes against
the server's ``Content-Length``, checks the hash, and only then renames it to ``dest`` — so a killed
or failed download never leaves a file that looks complete, and two processes fetching the same file
at once each rename a whole, verified copy. Any failure removes the temporary file and raises
:class:`DownloadError` (a :class:`~kmel.models.weights.WeightsError`) whose message is one line:
the URL tried and why it failed.

Mirror: ``mirror`` (a config's ``weights_mirror``) or else the environment variable
``KMEL_WEIGHTS_MIRROR`` replaces the whole download base: the file ``NAME`` is fetched from
``MIRROR/NAME``. The layout is flat — one folder holding the files under their published names —
so any static web server (or a shared folder: a plain path or ``file://`` URL) can serve them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from kmel import __version__


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; the message says which file, where, and what to do."""


MIRROR_ENV = "KMEL_WEIGHTS_MIRROR"
USER_AGENT = f"kmel/{__version__} (weights download; Python urllib)"
TIMEOUT_S = 60.0  # per connect and per read, not for the whole file
CHUNK = 1 << 20


class DownloadError(WeightsError):
    """A download that failed or did not verify; ``url`` and ``reason`` are kept for the caller's message."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, " ".join(str(reason).split())  # one line
        super().__init__(f"download of {url} failed: {self.reason}")


def mirror_base(configured: str | None = None) -> str | None:
    """The mirror base URL: ``configured`` when non-empty, else ``$KMEL_WEIGHTS_MIRROR``, else None.

    A value without ``://`` is a local folder and becomes a ``file://`` URL.
    """
    value = (configured or "").strip() or os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    if "://" not in value:
        return Path(value).expanduser().resolve().as_uri()
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise WeightsError(f"weights mirror {value!r} must be an http://, https:// or file:// URL or a folder path")
    return value.rstrip("/")


def source_url(url: str, mirror: str | None = None) -> str:
    """``url`` itself, or ``MIRROR/NAME`` (``NAME`` = the URL's last path part) when a mirror is set."""
    base = mirror_base(mirror)
    if base is None:
        return url
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    return f"{base}/{name}"


def _hashers(sha256: str | None, sha256_prefix: str | None, md5: str | None) -> dict[str, "hashlib._Hash"]:
    hashers = {}
    if sha256 or sha256_prefix:
        hashers["sha256"] = hashlib.sha256()
    if md5:
        hashers["md5"] = hashlib.md5()
    return hashers


def _mismatch(hashers: dict, sha256: str | None, sha256_prefix: str | None, md5: str | None) -> str | None:
    """Why the digests do not match, or None when they all do."""
    if sha256 and hashers["sha256"].hexdigest() != sha256.lower():
        return f"sha256 is {hashers['sha256'].hexdigest()}, expected {sha256.lower()}"
    if sha256_prefix and not hashers["sha256"].hexdigest().startswith(sha256_prefix.lower()):
        return f"sha256 is {hashers['sha256'].hexdigest()}, which does not start with {sha256_prefix.lower()}"
    if md5 and hashers["md5"].hexdigest() != md5.lower():
        return f"md5 is {hashers['md5'].hexdigest()}, expected {md5.lower()}"
    return None


def file_mismatch(path: Path, sha256: str | None = None, sha256_prefix: str | None = None,
                  md5: str | None = None) -> str | None:
    """Check a file on disk the same way as a download: the reason it fails, or None."""
    hashers = _hashers(sha256, sha256_prefix, md5)
    if not hashers:
        return None
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return _mismatch(hashers, sha256, sha256_prefix, md5)


def fetch_verified(url: str, dest: str | Path, sha256: str | None = None, sha256_prefix: str | None = None,
                   md5: str | None = None, mirror: str | None = None, progress: bool = True,
                   timeout: float | None = None) -> Path:
    """``dest``, downloaded from ``url`` (or ``MIRROR/NAME``) unless already there and verified.

    Give at least one of ``sha256`` (the full digest), ``sha256_prefix`` (its first hex digits, as
    torchvision publishes in its file names) or ``md5`` (what Keras' own tables hold). A cached file
    that fails the check is fetched again. Progress goes to stderr (tqdm) unless ``progress=False``.
    """
    dest = Path(dest)
    if not (sha256 or sha256_prefix or md5):
        raise ValueError("fetch_verified needs a hash to check against")
    if dest.is_file() and file_mismatch(dest, sha256, sha256_prefix, md5) is None:
        return dest
    source = source_url(url, mirror)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DownloadError(source, f"cannot write to {dest.parent} ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            _download(source, out, _hashers(sha256, sha256_prefix, md5), dest.name, progress,
                      TIMEOUT_S if timeout is None else timeout, sha256, sha256_prefix, md5)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _download(url: str, out, hashers: dict, name: str, progress: bool, timeout: float,
              sha256: str | None, sha256_prefix: str | None, md5: str | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    received, expected = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      disable=not progress, dynamic_ncols=True, leave=False) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f"no answer within {timeout:g} s"
        raise DownloadError(url, f"{reason}") from None
    except (socket.timeout, TimeoutError):
        raise DownloadError(url, f"stalled: no data for {timeout:g} s after {received} bytes") from None
    except http.client.IncompleteRead as exc:
        raise DownloadError(url, f"truncated: connection closed after {received + len(exc.partial)} bytes") from None
    except (http.client.HTTPException, OSError) as exc:
        raise DownloadError(url, f"{type(exc).__name__}: {exc}") from None
    if expected is not None and received != expected:
        raise DownloadError(url, f"truncated: received {received} of {expected} bytes")
    problem = _mismatch(hashers, sha256, sha256_prefix, md5)
    if problem:
        raise DownloadError(url, f"{problem}: the file is damaged or not the published one; not kept")
