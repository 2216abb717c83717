"""Robust image reading and small pixel helpers (Python side: Pillow / OpenCV, no TensorFlow).

:func:`load_image` turns whatever a folder holds into RGB uint8 or raises :class:`ImageReadError`
with the file and the reason: EXIF orientation is applied, grayscale / palette / CMYK converted,
transparency composited over white, 16-bit data scaled (÷257, not clipped), GIF and WebP read at
their first frame; empty, truncated, non-image and oversized files are refused, and formats that
are not decoded (HEIC, JPEG 2000, DICOM...) are named.

Files are checked before they are opened (:func:`check_file`): only regular files (after
following symlinks) are read, and only up to a size bound, so a FIFO, ``/dev/zero`` or a
multi-gigabyte file named ``x.jpg`` costs one error, not a hung or killed run.

Pillow bounds an image's size by one process-wide number, ``PIL.Image.MAX_IMAGE_PIXELS``; a decode holds it
at its own ``max_pixels`` through :func:`pillow_pixel_limit`, so decoding threads never see each other's bound.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kmel.constants import HDF5_SUFFIXES, IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS

DEFAULT_MAX_PIXELS = 200_000_000
MIB = 1 << 20
DEFAULT_MAX_BYTES = 256 * MIB
EXIF_ORIENTATION = 0x0112
SNIFF_BYTES = 132  # DICOM's magic sits at offset 128
DECODED_FORMATS = ("JPEG", "PNG", "GIF", "WebP", "BMP", "TIFF")


class ImageReadError(Exception):
    """A file that cannot be used as an image; the message names the file and the reason."""


def sniff_format(head: bytes) -> str | None:
    """The image format a file's first bytes (:data:`SNIFF_BYTES` of them) announce, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 26 and head[6:10] == b"\0\0\0\0":  # reserved bytes are zero
        return "BMP"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC"
    if head.startswith(b"\0\0\0\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    if head.startswith(b"\0\0\0\x0cJXL \r\n\x87\n") or head.startswith(b"\xff\x0a"):
        return "JPEG XL"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"8BPS"):
        return "Photoshop PSD"
    return None


def unsupported_format(head: bytes, name: str = "") -> str | None:
    """The format of an image kmel does not decode, from its bytes or else its extension; None otherwise."""
    found = sniff_format(head)
    if found is not None:
        return None if found in DECODED_FORMATS else found
    return UNSUPPORTED_IMAGE_EXTENSIONS.get(os.path.splitext(name)[1].lower())


def file_kind(mode: int) -> str:
    """What a stat mode is, in words."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _too_large(size: int, max_bytes: int) -> str:
    return f"{size / MIB:,.1f} MiB, over the {max_bytes / MIB:,.0f} MiB limit (max_file_mb): not read"


def check_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """Why ``path`` must not be read (None: a regular file within ``max_bytes``). Never opens it."""
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else "no such file"
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        kind = file_kind(info.st_mode)
        return "is a directory, not an image file" if kind == "directory" else f"is a {kind}, not a regular file: not opened"
    if info.st_size > max_bytes:
        return _too_large(info.st_size, max_bytes)
    return None


def _open_readonly(path: str | Path) -> int:
    # O_NONBLOCK: a FIFO swapped in after check_file cannot block the open.
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))


def read_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else raises :class:`ImageReadError`."""
    reason = check_file(path, max_bytes)
    if reason:
        raise ImageReadError(f"{path}: {reason}")
    try:
        fd = _open_readonly(path)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)  # the file that was opened, whatever the name pointed to a moment ago
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(f"{path}: is a {file_kind(info.st_mode)}, not a regular file: not read")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # grew after the check
            raise ImageReadError(f"{path}: {_too_large(total, max_bytes)}")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        gray = (arr.astype(np.uint32) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _decode_16bit_png(data: bytes) -> np.ndarray | None:
    """OpenCV keeps 16-bit colour PNGs that Pillow would truncate to 8 bits per channel oddly."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        return None
    arr = (arr.astype(np.uint32) // 257).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB)


def _draft_size(size: tuple[int, int], min_long_side: int) -> tuple[int, int]:
    """Pillow ``draft`` request keeping the aspect, so the reduction is set by the long side alone."""
    w, h = size
    scale = min_long_side / max(w, h)
    return max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))


class _PillowLimit:
    """Who holds ``PIL.Image.MAX_IMAGE_PIXELS`` and at what value (see :func:`pillow_pixel_limit`)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.value: int | None = None
        self.holders = 0
        self.found: int | None = None

    @contextmanager
    def hold(self, max_pixels: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: not self.holders or self.value == max_pixels)
            if not self.holders:
                self.found, self.value = Image.MAX_IMAGE_PIXELS, max_pixels
                Image.MAX_IMAGE_PIXELS = max_pixels
            self.holders += 1
        try:
            yield
        finally:
            with self.changed:
                self.holders -= 1
                if not self.holders:
                    Image.MAX_IMAGE_PIXELS, self.value = self.found, None
                    self.changed.notify_all()


_PILLOW_LIMIT = _PillowLimit()


def pillow_pixel_limit(max_pixels: int) -> AbstractContextManager[None]:
    """Hold Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` at ``max_pixels`` while the ``with`` block runs.

    Pillow has no per-call bound, and a bare set-decode-restore in two threads can leave either one's value (or
    decode under the other's). Here threads asking for the same limit share it and run side by side (kmel's
    decoders all ask for the same); a thread asking for another waits until they are done; the last one out puts
    back the value found. Not re-entrant with a different limit.
    """
    return _PILLOW_LIMIT.hold(max_pixels)


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageReadError(f"{name}: image too large: {img.width}x{img.height} is over the {max_pixels:,} "
                             "pixel limit")


def _decode(
    data: bytes, name: str, max_pixels: int, min_long_side: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    unsupported = unsupported_format(data[:SNIFF_BYTES], name)
    if unsupported:
        raise ImageReadError(f"{name}: {unsupported} image: format not supported (kmel decodes "
                             f"{', '.join(DECODED_FORMATS)}); convert it to JPEG or PNG")
    # Pillow refuses over twice the limit (and only warns over it): the size is checked here from the header,
    # before anything is decoded, and again after loading (an icon's embedded frame may be larger than declared).
    try:
        with pillow_pixel_limit(max_pixels):
            img = Image.open(io.BytesIO(data))  # an animated GIF or WebP: its first frame
            _check_pixels(img, name, max_pixels)
            w, h = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90°
                w, h = h, w
            if min_long_side and img.format == "JPEG" and max(w, h) >= 2 * min_long_side:
                img.draft("RGB", _draft_size(img.size, min_long_side))
            img.load()
            _check_pixels(img, name, max_pixels)
        if img.format == "PNG" and len(data) > 24 and data[24] == 16:  # IHDR bit depth
            deep = _decode_16bit_png(data)
            if deep is not None:
                return np.ascontiguousarray(ImageOps.exif_transpose(Image.fromarray(deep))), (h, w)
        img = ImageOps.exif_transpose(img)
        return np.ascontiguousarray(_to_rgb(img)), (h, w)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image (cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{name}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: truncated or corrupt image data ({exc})") from None


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to RGB uint8 H×W×3; raises :class:`ImageReadError`."""
    return _decode(data, name, max_pixels)[0]


def load_image_reduced(
    data: bytes, min_long_side: int, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`load_image_bytes`, but a JPEG at least twice ``min_long_side`` is decoded at
    1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg scaling via Pillow ``draft``): the largest
    reduction whose long side stays ≥ ``min_long_side``. Several times faster on multi-megapixel
    photographs that are shrunk anyway. Returns the image and the file's full (height, width)
    after EXIF orientation.
    """
    return _decode(data, name, max_pixels, min_long_side)


def load_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Read an image file as RGB uint8 H×W×3; raises :class:`ImageReadError` naming the file.

    Only a regular file of at most ``max_bytes`` is opened (see :func:`read_file`).
    """
    return load_image_bytes(read_file(path, max_bytes), name=str(path), max_pixels=max_pixels)


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so the longer side is ``long_side`` (aspect kept); area filter when shrinking."""
    h, w = image.shape[:2]
    if max(h, w) == long_side:
        return image
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def pad_to_square(image: np.ndarray, value: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pad the short side symmetrically (odd pixel at bottom/right); returns (image, (top, bottom, left, right))."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    bottom, right = side - h - top, side - w - left
    if not (top or bottom or left or right):
        return image, (0, 0, 0, 0)
    padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    return padded, (top, bottom, left, right)


def encode_jpeg(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 2-D array (as is) or an RGB image."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(".png", data)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class Found:
    """One entry of a folder walk: an image file to read, or something reported in its place.

    ``status``: ``file`` (to be read), ``container`` (an ``.hdf5`` / ``.h5`` file: its datasets are the images,
    :mod:`kmel.data.hdf5`), ``error`` (named like an image but cannot be one: a directory, FIFO, device, socket or
    broken symlink; never opened) or ``skipped`` (a folder reached a second time through a symlink: walked once,
    reported, not an error).
    """

    path: Path
    status: str = "file"
    reason: str = ""


def is_container(path: str | Path) -> bool:
    """Named like an HDF5 file (``.hdf5`` / ``.h5``, any case): many images inside, read by :mod:`kmel.data.hdf5`."""
    return str(path).lower().endswith(HDF5_SUFFIXES)


def found_file(path: Path) -> Found:
    """A file to read as a walk entry: ``error`` when it cannot be one (never opened; the size bound is the
    reader's), ``container`` for an HDF5 file, else ``file``."""
    reason = check_file(path, max_bytes=1 << 62)
    if reason:
        return Found(path, "error", reason)
    return Found(path, "container" if is_container(path) else "file")


def _looks_like_image(entry: os.DirEntry) -> bool:
    """By extension (decoded or not), else by the first bytes of a regular file."""
    suffix = os.path.splitext(entry.name)[1].lower()
    if suffix in IMAGE_EXTENSIONS or suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
        return True
    try:
        if not entry.is_file(follow_symlinks=True):  # never open a FIFO or device to sniff it
            return False
        with open(entry.path, "rb") as handle:
            return sniff_format(handle.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def walk_images(folder: str | Path) -> list[Found]:
    """Every image-like entry under ``folder`` (recursive, sorted), each once.

    Image-like: a decoded or known-but-unsupported extension in any case, or (for regular files)
    image magic bytes; HDF5 files are listed as ``container``. Symlinked folders are followed once, so a symlink loop cannot hang the walk.
    """
    folder = Path(folder)
    found: list[Found] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            real = os.path.realpath(current)
        except OSError:
            continue
        if real in seen:
            if current != folder:
                found.append(Found(current, "skipped", "symlink loop or repeated folder: walked once"))
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            found.append(Found(current, "error", f"cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(Found(path, "error", "is a directory, not an image file"))
                stack.append(path)
            elif is_container(entry.name) or _looks_like_image(entry):
                found.append(found_file(path))
    return sorted(found, key=lambda f: str(f.path))


def list_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` and the entries reported instead, with reasons (see :func:`walk_images`)."""
    found = walk_images(folder)
    return [f.path for f in found if f.status == "file"], [(f.path, f.reason) for f in found if f.status != "file"]


def flip_views(batch: np.ndarray) -> list[np.ndarray]:
    """The four flips of an [N, H, W, ...] batch that test-time averaging uses: as is, left–right, up–down, both.
    Each flip is its own inverse: the same view of a per-pixel output puts it back in place."""
    return [batch, batch[:, :, ::-1], batch[:, ::-1], batch[:, ::-1, ::-1]]
