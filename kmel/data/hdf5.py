"""Images stored inside HDF5 files, as the ISIC 2024 challenge (SLICE-3D) ships them: ``train-image.hdf5`` holds one
dataset per ``isic_id``, each the encoded bytes (a JPEG) of one crop. They are read one at a time, straight out of
the file: a 401,059-crop file is never loaded whole and never unpacked to disk.

An image inside a container is named ``<path of the .hdf5 / .h5 file>/<dataset name>``, e.g.
``data/isic2024/train-image.hdf5/ISIC_0015657``; :func:`split_member` reads such a name back, :func:`read_source`
reads either kind of name. Each process keeps a few containers open (h5py handles are never shared across a fork:
they are keyed by process id). Every failure is an :class:`~kmel.data.images.ImageReadError` naming the file and
the key, so a damaged crop is one skipped row. A container replaced or rewritten since it was opened is opened
again (its inode, size and modification time are compared on each read).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from kmel.data.images import (
    ImageReadError,
    _too_large,
    check_file,
    is_container,
    read_file,
)

OPEN_CONTAINERS = 4  # per process; a data folder rarely has more than train + test

# (pid, path) -> (handle, (inode, size, mtime)). One lock for the cache and every read: h5py serialises its calls
# anyway, and a handle is closed only under the lock, so no thread can be reading from it then.
_open: OrderedDict[tuple[int, str], tuple[Any, tuple[int, int, int]]] = OrderedDict()
_lock = threading.RLock()


def member_name(container: str | Path, key: str) -> str:
    """The name of the image ``key`` inside ``container``: ``<container>/<key>``."""
    return f"{container}/{key}"


def split_member(name: str | Path) -> tuple[str, str] | None:
    """(container, key) when ``name`` is an image inside an HDF5 file (its parent is an existing ``.hdf5`` /
    ``.h5`` file), else None (a plain file name)."""
    head, sep, key = str(name).rpartition("/")
    if sep and key and is_container(head) and os.path.isfile(head):
        return head, key
    return None


def _container(path: str) -> Any:
    """The open file (call with ``_lock`` held); ImageReadError naming ``path`` when it cannot be one."""
    import h5py

    reason = check_file(path, max_bytes=1 << 62)
    if reason:
        raise ImageReadError(f"{path}: {reason}")
    info = os.stat(path)
    key, version = (os.getpid(), os.path.abspath(path)), (info.st_ino, info.st_size, info.st_mtime_ns)
    if key in _open and _open[key][1] == version:  # the same file, unchanged since it was opened
        _open.move_to_end(key)
        return _open[key][0]
    if key in _open:
        _open.pop(key)[0].close()
    try:
        # No file locking: reading only, and HDF5's locks fail on some network file systems (NFS, Lustre).
        handle = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise ImageReadError(f"{path}: not a readable HDF5 file ({exc})") from None
    _open[key] = (handle, version)
    while len(_open) > OPEN_CONTAINERS:
        (pid, _), (old, _) = _open.popitem(last=False)
        if pid == os.getpid():  # a forked child's copy of its parent's handle is left alone
            old.close()
    return handle


def close_containers() -> None:
    """Close this process's open containers (the next read opens them again)."""
    with _lock:
        for (pid, _), (handle, _) in list(_open.items()):
            if pid == os.getpid():
                handle.close()
        _open.clear()


def list_members(container: str | Path) -> list[str]:
    """The names of the datasets at the top of ``container``, sorted (groups are not images and are left out);
    ImageReadError when it is not a readable HDF5 file or holds no dataset (e.g. a Keras ``weights.h5``)."""
    import h5py

    with _lock:
        handle = _container(str(container))
        try:
            names = sorted(name for name, item in handle.items() if isinstance(item, h5py.Dataset))
        except (OSError, RuntimeError) as exc:
            raise ImageReadError(f"{container}: cannot list its datasets ({exc})") from None
    if not names:
        raise ImageReadError(f"{container}: holds no datasets at its top level, so no images (kmel reads HDF5 files "
                             "with one dataset of encoded image bytes per image id, as ISIC 2024's train-image.hdf5)")
    return names


def source_size(name: str | Path) -> int | None:
    """The size in bytes of an image file, or of the encoded image stored in an HDF5 dataset, without reading it;
    None when it cannot be told (then compare contents)."""
    inside = split_member(name)
    try:
        if not inside:
            return os.stat(name).st_size
        with _lock:
            return _encoded_size(_container(inside[0]).get(inside[1]))
    except (ImageReadError, OSError, RuntimeError):
        return None


def _encoded_size(item: Any) -> int | None:
    """The byte length of the encoded image a dataset holds in an accepted layout — a scalar fixed-length bytes
    (``S<n>``, ISIC 2024's) or opaque dataset, or a 1-D ``uint8`` array — else None (a group, a pixel array)."""
    import h5py

    if not isinstance(item, h5py.Dataset):
        return None
    if item.shape == () and item.dtype.kind in "SV" and item.dtype.itemsize:
        return int(item.dtype.itemsize)
    if len(item.shape) == 1 and item.dtype == np.uint8:
        return int(item.shape[0])
    return None


def read_member(container: str | Path, key: str, max_bytes: int) -> bytes:
    """The encoded image bytes stored under ``key`` in ``container``; at most ``max_bytes`` are read.

    Accepted layouts: those of :func:`_encoded_size`. Anything else (a pixel array, a group) raises with what it
    holds.
    """
    name = member_name(container, key)
    with _lock:
        return _read(name, container, key, max_bytes)


def _read(name: str, container: str | Path, key: str, max_bytes: int) -> bytes:
    import h5py

    try:
        handle = _container(str(container))
    except ImageReadError as exc:
        raise ImageReadError(f"{name}: {exc}") from None
    try:
        item = handle.get(key)
        if item is None:
            raise ImageReadError(f"{name}: no dataset of that name in the HDF5 file")
        if not isinstance(item, h5py.Dataset):
            raise ImageReadError(f"{name}: is an HDF5 group, not an image")
        size = _encoded_size(item)
        if size is None:
            raise ImageReadError(f"{name}: holds a {item.dtype} array of shape {item.shape}, not the encoded bytes of "
                                 "one image (kmel reads datasets of JPEG / PNG bytes, as in ISIC 2024's "
                                 "train-image.hdf5)")
        if size > max_bytes:
            raise ImageReadError(f"{name}: {_too_large(size, max_bytes)}")
        if item.shape != ():
            return item[()].tobytes()
        value = np.empty((), item.dtype)
        item.read_direct(value)  # all itemsize bytes: numpy's bytes_ would drop trailing NULs
        return value.tobytes()
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ImageReadError(f"{name}: cannot be read ({exc})") from None


def read_source(name: str | Path, max_bytes: int) -> bytes:
    """The bytes of an image file, or of an image inside an HDF5 file (``<file.hdf5>/<key>``)."""
    inside = split_member(name)
    return read_member(*inside, max_bytes) if inside else read_file(name, max_bytes)
