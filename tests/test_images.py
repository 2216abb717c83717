"""A corpus of awkward and broken image files: each either loads as RGB uint8 or is refused by name."""

from __future__ import annotations

import io
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from kmel.data.images import (
    ImageReadError,
    list_images,
    load_image,
    load_image_bytes,
    load_image_reduced,
    pad_to_square,
    resize_long_side,
)


def _jpeg(rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], axis=2).astype(np.uint8)


def _corrupt_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gradient(64, 64)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 40] = b"\xff" * 30  # compressed pixel data overwritten
    return bytes(data)


# name -> (bytes-making function, expected: "ok" or a phrase of the error)
BROKEN = {
    "empty.jpg": (lambda: b"", "empty file"),
    "truncated.jpg": (lambda: _jpeg(_gradient(200, 300))[:600], "truncated or corrupt"),
    "text.jpg": (lambda: b"image_id,label\nISIC_0000000,benign\n", "not an image"),
    "html.png": (lambda: b"<html><body>403 Forbidden</body></html>", "not an image"),
    "png_header_only.png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not an image"),
    "png_bad_data.png": (lambda: _corrupt_png(), "truncated or corrupt"),
    "random_bytes.bmp": (lambda: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not an image"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_are_refused_with_file_and_reason(tmp_path, name):
    make, phrase = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(path) in str(info.value) and phrase in str(info.value)


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageReadError, match="is a directory"):
        load_image(tmp_path / "folder.jpg")


def test_oversized_image_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(ImageReadError, match="too large"):
        load_image(path, max_pixels=1_000_000)


def test_decodes_in_threads_each_keep_their_own_pixel_limit(monkeypatch):
    """Pillow's bound is one process-wide number (Image.MAX_IMAGE_PIXELS) that each decode sets to its own
    max_pixels. Threads decoding a 30,000-pixel image at once, half with a 10,000-pixel limit (refused) and half
    with the default (decoded): each gets its own outcome, never a refusal from the other's bound, and the value
    found before is back afterwards. Image.open is slowed so the threads overlap inside the decode."""
    data = io.BytesIO()
    Image.new("L", (300, 100), 128).save(data, "PNG")
    data = data.getvalue()
    real_open = Image.open

    def slow_open(*args, **kwargs):
        time.sleep(0.003)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 123_456_789)  # whatever the process had
    start, outcomes, lock = threading.Barrier(8), [], threading.Lock()

    def decode(limit: int) -> None:
        start.wait()
        for _ in range(6):
            try:
                load_image_bytes(data, "x.png", max_pixels=limit)
                got = "decoded"
            except ImageReadError as exc:
                got = "refused" if "too large" in str(exc) else str(exc)
            with lock:
                outcomes.append((limit, got))

    threads = [threading.Thread(target=decode, args=(10_000 if i % 2 else 200_000_000,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 48
    assert {limit: {got for lim, got in outcomes if lim == limit} for limit, _ in outcomes} == {
        10_000: {"refused"}, 200_000_000: {"decoded"}}
    assert Image.MAX_IMAGE_PIXELS == 123_456_789


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    gray = _gradient()[..., 0]
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray).save(path)
    out = load_image(path)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_rgba_png_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, ..., 3] = 255  # top half opaque red-ish, bottom half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image(path)
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[9, 9]) == (255, 255, 255)


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((0, 0), 0)
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[4, 4]) == (10, 200, 30)


def test_16bit_grayscale_png_scaled_not_clipped(tmp_path):
    arr = np.full((6, 6), 65535, np.uint16)
    arr[0, 0] = 257 * 100
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), arr)
    out = load_image(path)
    assert out.dtype == np.uint8 and out[1, 1, 0] == 255 and out[0, 0, 0] == 100


def test_16bit_colour_png_scaled_and_rgb_order(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 2] = 65535  # red in OpenCV's BGR order
    bgr[..., 0] = 257 * 50
    path = tmp_path / "deep_rgb.png"
    assert cv2.imwrite(str(path), bgr)
    out = load_image(path)
    assert tuple(out[0, 0]) == (255, 0, 50)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_gradient()).convert("CMYK").save(path, "JPEG", quality=95)
    out = load_image(path)
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - _gradient().astype(int)).mean() < 12


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_gradient(40, 60))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).shape == (60, 40, 3)


def _photo(h: int, w: int) -> np.ndarray:
    """Smooth, photo-like content (JPEG's DCT scaling is exact only where detail is coarse)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
    g = 120 + 80 * np.cos((x + y) / 173.0)
    b = 90 + 60 * np.sin(y / 59.0)
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8)


def test_reduced_decode_matches_full_decode_and_reports_full_size():
    data = _jpeg(_photo(1600, 2400))
    full = load_image_bytes(data)
    reduced, size = load_image_reduced(data, 512)
    assert size == (1600, 2400)
    assert reduced.shape == (400, 600, 3)  # 1/4: the largest reduction with a long side >= 512
    reference = cv2.resize(full, (600, 400), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - reference.astype(int)).mean() < 2.0
    # Not reduced: small JPEGs (< 2x the need), PNGs, and no request at all.
    assert load_image_reduced(data, 900)[0].shape == (800, 1200, 3)
    assert load_image_reduced(data, 1300)[0].shape == (1600, 2400, 3)
    buf = io.BytesIO()
    Image.fromarray(_photo(1600, 2400)).save(buf, "PNG")
    assert load_image_reduced(buf.getvalue(), 256)[0].shape == (1600, 2400, 3)


def test_reduced_decode_applies_exif_orientation():
    img = Image.fromarray(_photo(800, 1200))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    reduced, size = load_image_reduced(buf.getvalue(), 256)
    assert size == (1200, 800)  # as shown, not as stored
    assert reduced.shape == (300, 200, 3)


def test_float_tiff_and_one_pixel_image(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((5, 7), 0.5, np.float32), mode="F").save(path)
    out = load_image(path)
    assert out.shape == (5, 7, 3) and int(out[0, 0, 0]) == 127
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(one)
    assert load_image(one).shape == (1, 1, 3)


def test_trailing_garbage_after_jpeg_still_loads(tmp_path):
    path = tmp_path / "tail.jpg"
    path.write_bytes(_jpeg(_gradient()) + b"\x00garbage" * 50)
    assert load_image(path).shape == (40, 60, 3)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.jpg"
    path.write_bytes(_jpeg(_gradient()))

    def denied(path):  # chmod 0 does not stop root, so the OS error is simulated
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("kmel.data.images._open_readonly", denied)
    with pytest.raises(ImageReadError, match="cannot read file \\(Permission denied\\)"):
        load_image(path)


def test_list_images_walks_safely(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.JPG").write_bytes(b"1")
    (root / "y.PNG").write_bytes(b"1")
    (root / "z.Jpeg").write_bytes(b"1")
    (root / "w.bmp").write_bytes(b"1")
    (root / "notes.txt").write_text("not an image")
    (root / "dir.jpg").mkdir()
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    files, skipped = list_images(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a/b/x.JPG", "w.bmp", "y.PNG", "z.Jpeg"]
    reasons = {p.name: r for p, r in skipped}
    assert reasons["dir.jpg"] == "is a directory, not an image file"
    assert reasons["dangling.jpg"] == "broken symlink"
    assert "symlink loop" in reasons["loop"]


def test_resize_and_pad_helpers():
    img = _gradient(40, 60)
    small = resize_long_side(img, 30)
    assert small.shape == (20, 30, 3)
    padded, pads = pad_to_square(small)
    assert padded.shape == (30, 30, 3) and pads == (5, 5, 0, 0)
    assert resize_long_side(img, 60) is img


@pytest.mark.realdata
def test_real_full_resolution_images_load(shared_data):
    folder = shared_data / "isic-archive-fullres" / "images"
    files, skipped = list_images(folder)
    assert len(files) == 24 and skipped == []
    import pandas as pd

    sizes = pd.read_csv(shared_data / "isic-archive-fullres" / "labels.csv").set_index("image_id")
    for path in files[:6]:
        img = load_image(path)
        row = sizes.loc[path.stem]
        assert img.shape[2] == 3 and {img.shape[0], img.shape[1]} == {int(row["width"]), int(row["height"])}


# === Files checked before they are read ===


def test_fifo_device_and_oversize_files_are_refused_unread(tmp_path):
    import os

    from kmel.data.images import check_file

    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "big.jpg").write_bytes(_jpeg(_gradient()))
    # Each would block or read without bound if opened; each fails at once, naming what it is.
    with pytest.raises(ImageReadError, match="is a FIFO \\(named pipe\\), not a regular file"):
        load_image(tmp_path / "fifo.jpg")
    with pytest.raises(ImageReadError, match="is a character device"):
        load_image(tmp_path / "zero.jpg")
    size = (tmp_path / "big.jpg").stat().st_size
    with pytest.raises(ImageReadError, match="over the 0 MiB limit"):
        load_image(tmp_path / "big.jpg", max_bytes=size - 1)
    assert load_image(tmp_path / "big.jpg", max_bytes=size).shape == (40, 60, 3)
    assert check_file(tmp_path / "missing.jpg") == "no such file"


def test_read_file_refuses_a_fifo_swapped_in_after_the_check(tmp_path, monkeypatch):
    import os

    from kmel.data import images

    os.mkfifo(tmp_path / "swapped.jpg")
    monkeypatch.setattr(images, "check_file", lambda path, max_bytes: None)  # the check saw a regular file
    with pytest.raises(ImageReadError, match="FIFO"):  # O_NONBLOCK open, then fstat: no hang
        images.read_file(tmp_path / "swapped.jpg")


def test_webp_and_gif_first_frame_are_decoded(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "x.webp", lossless=True)
    assert np.array_equal(load_image(tmp_path / "x.webp"), rgb)
    frames = [Image.new("RGB", (30, 20), c) for c in ((200, 10, 10), (10, 200, 10))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = load_image(tmp_path / "anim.gif")
    assert first.shape == (20, 30, 3) and tuple(first[0, 0]) == (200, 10, 10)


@pytest.mark.parametrize("name, data, fmt", [
    ("photo.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC"),
    ("fake.heic", b"not really anything", "HEIC"),  # by its extension
    ("scan.jp2", b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 32, "JPEG 2000"),
    ("renamed.jpg", b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 32, "JPEG 2000"),  # by its bytes
    ("slice.dcm", b"\0" * 128 + b"DICM" + b"\0" * 32, "DICOM"),
])
def test_unsupported_formats_are_named(tmp_path, name, data, fmt):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageReadError, match=f"{fmt} image: format not supported"):
        load_image(tmp_path / name)


def test_walk_lists_every_image_like_entry_and_names_what_cannot_be_read(tmp_path):
    import os

    from kmel.data.images import walk_images

    (tmp_path / "a.webp").write_bytes(b"x")
    (tmp_path / "b.gif").write_bytes(b"x")
    (tmp_path / "c.HEIC").write_bytes(b"x")
    (tmp_path / "no_extension").write_bytes(_jpeg(_gradient()))  # a JPEG by its bytes
    (tmp_path / "notes.txt").write_text("text")
    os.mkfifo(tmp_path / "fifo.jpg")
    os.mkfifo(tmp_path / "plain_fifo")  # not named like an image and never opened: not listed
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    found = {f.path.name: (f.status, f.reason) for f in walk_images(tmp_path)}
    assert set(found) == {"a.webp", "b.gif", "c.HEIC", "no_extension", "fifo.jpg", "zero.jpg"}
    assert found["fifo.jpg"][0] == "error" and "FIFO" in found["fifo.jpg"][1]
    assert found["zero.jpg"][0] == "error" and "character device" in found["zero.jpg"][1]
    assert found["no_extension"] == ("file", "")
