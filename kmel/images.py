"""Robust image reading and small pixel helpers (Python side: Pillow / OpenCV, no TensorFlow).

:func:`load_image` turns whatever a folder holds into RGB uint8 or raises :class:`ImageReadError`
with the file and the reason: EXIF orientation is applied, grayscale / palette / CMYK converted,
transparency composited over white, 16-bit data scaled (÷257, not clipped); empty, truncated,
non-image and oversized files are refused.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kmel.constants import IMAGE_EXTENSIONS

DEFAULT_MAX_PIXELS = 200_000_000
EXIF_ORIENTATION = 0x0112


class ImageReadError(Exception):
    """A file that cannot be used as an image; the message names the file and the reason."""


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


def _decode(
    data: bytes, name: str, max_pixels: int, min_long_side: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageReadError(
                    f"{name}: {img.width}x{img.height} is larger than the {max_pixels:,} pixel limit"
                )
            w, h = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90°
                w, h = h, w
            if min_long_side and img.format == "JPEG" and max(w, h) >= 2 * min_long_side:
                img.draft("RGB", _draft_size(img.size, min_long_side))
            img.load()
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
    finally:
        Image.MAX_IMAGE_PIXELS = previous


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


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 H×W×3; raises :class:`ImageReadError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return load_image_bytes(data, name=str(path), max_pixels=max_pixels)


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


def list_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` (recursive, any-case extensions, sorted) and skipped entries.

    Symlinked folders are followed once (a symlink loop cannot hang the walk); a directory
    named like an image (``x.jpg``) is reported as skipped, not returned.
    """
    folder = Path(folder)
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
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
                skipped.append((current, "symlink loop or repeated folder: walked once"))
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            skipped.append((current, f"cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if is_image_name:
                    skipped.append((path, "is a directory, not an image file"))
                stack.append(path)
            elif is_image_name:
                if entry.is_symlink() and not path.exists():
                    skipped.append((path, "broken symlink"))
                else:
                    files.append(path)
    return sorted(files, key=str), sorted(skipped, key=lambda s: str(s[0]))
