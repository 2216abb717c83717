"""``kmel serve``'s requests: the body in memory, its multipart parts, the form fields checked, the images' sizes.

Nothing here touches the disk unless asked (:func:`save_uploads`): the body is read into memory up to a limit and
its parts are parsed in memory, never spooled to temporary files. :class:`ApiError` is how every check answers
(its status and one line, sent as ``{"error": ...}`` by :mod:`kmel.serving.app`).
"""

from __future__ import annotations

import base64
import io
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from fastapi import Request

from kmel import constants as C
from kmel.data.images import DEFAULT_MAX_PIXELS, MIB, pillow_pixel_limit
from kmel.serving.outputs import printable

METADATA_FIELDS = (C.COL_AGE, C.COL_SEX, C.COL_SITE)  # accepted without a fusion model: echoed into each entry
MAX_FIELD_CHARS = 64
SHOWN_FIELDS = 12  # an unknown field's 400 names this many of the known ones


class ApiError(Exception):
    """An answer other than 200: its status and one line, sent as ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Upload:
    """One uploaded file: the client's file name (its last path part, printable) and its bytes."""

    name: str
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    too_large = ApiError(413, f"request larger than the {limit / MIB:g} MiB limit (kmel serve --max-request-mb): "
                              "send fewer or smaller images per request")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> tuple[list[Upload], dict[str, str]]:
    """The files and text fields of a multipart/form-data body, parsed in memory (nothing is spooled to disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "send the images as multipart/form-data, e.g. curl -F files=@a.jpg -F files=@b.jpg URL")
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    state: dict[str, Any] = {}

    def begin() -> None:
        state.update(headers={}, data=[], field=b"", value=b"")

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state.update(field=b"", value=b"")

    callbacks = {
        "on_part_begin": begin, "on_header_end": header_end,
        "on_header_field": lambda d, s, e: state.update(field=state["field"] + d[s:e]),
        "on_header_value": lambda d, s, e: state.update(value=state["value"] + d[s:e]),
        "on_part_data": lambda d, s, e: state["data"].append(d[s:e]),
        "on_part_end": lambda: parts.append((state["headers"], b"".join(state["data"]))),
    }
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise ApiError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    uploads, fields = [], {}
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disposition:
            filename = disposition[b"filename"].decode("utf-8", "surrogateescape").replace("\\", "/")
            if filename or data:  # a browser sends an empty part for a file input left empty
                base = PurePosixPath(filename).name or f"upload-{len(uploads) + 1}"
                uploads.append(Upload(printable(base), data))
        else:
            fields[name] = data.decode("utf-8", "replace").strip()
    return uploads, fields


def check_metadata(fields: Mapping[str, str], known: Sequence[str] = METADATA_FIELDS,
                   aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The metadata fields given, checked, under kmel's names (empty ones left out; ``age`` as a number).

    ``known``: the accepted names (age, sex, site; with a fusion model, every column it reads and its patient
    id); ``aliases``: other names for them (``age_approx`` → ``age``). A 400 for an unknown field (naming the
    known ones), a field given under two names, a value over :data:`MAX_FIELD_CHARS` characters, a bad age.
    """
    aliases = {alias: name for alias, name in (aliases or {}).items() if name in known}
    unknown = sorted(set(fields) - set(known) - set(aliases))
    if unknown:
        shown = ", ".join(known[:SHOWN_FIELDS]) + (" … (all in /api/model)" if len(known) > SHOWN_FIELDS else "")
        raise ApiError(400, f"unknown form field(s) {unknown}: images go in file fields, metadata in {shown}")
    out: dict[str, Any] = {}
    for given, value in fields.items():
        if not value:
            continue
        if len(value) > MAX_FIELD_CHARS:
            raise ApiError(400, f"form field {given}: at most {MAX_FIELD_CHARS} characters")
        name = aliases.get(given, given)
        if name in out:
            raise ApiError(400, f"form field {name} given twice (as {given} too): send it once")
        if name == C.COL_AGE:
            try:
                age = float(value)
            except ValueError:
                age = -1.0
            if not 0 <= age <= 130:
                raise ApiError(400, f"form field {given}: {value!r} is not an age in years")
            out[name] = age
        else:
            out[name] = value
    return out


def image_pixels(data: bytes) -> float | None:
    """Width × height from an image's header (nothing decoded), read under the bound every decode keeps
    (:data:`kmel.data.images.DEFAULT_MAX_PIXELS`); ``inf`` for an image Pillow will not open under it (over twice
    that bound: never decodable here); None when the bytes are no image Pillow knows (the decode then reports
    why, as that file's error entry)."""
    from PIL import Image

    try:
        with pillow_pixel_limit(DEFAULT_MAX_PIXELS), Image.open(io.BytesIO(data)) as img:
            return float(img.width * img.height)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return math.inf
    except Exception:
        return None


def png_data_url(rgb: np.ndarray) -> str:
    """An RGB uint8 image as a ``data:image/png;base64,…`` URL."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:] or "upload"


def save_uploads(folder: Path, uploads: Sequence[Upload]) -> None:
    """Save the uploads in ``folder`` (``--keep-uploads``), each under a new name: time, random id, its own name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for upload in uploads:
        (folder / f"{stamp}-{uuid.uuid4().hex[:8]}-{_safe_name(upload.name)}").write_bytes(upload.data)
