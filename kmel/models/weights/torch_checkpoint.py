"""Read PyTorch checkpoints (state dicts) into NumPy arrays without PyTorch and without trusting pickle.

Two on-disk formats exist:

* **legacy** (``torch.save(..., _use_new_zipfile_serialization=False)``, what most 2018–2020 model
  zoos shipped): five pickles in a row — magic number, protocol version, system info, the object
  whose tensors refer to storages by *persistent id*, then the list of storage keys — followed by
  each storage in that order as an int64 element count and its raw little-endian bytes.
* **zip** (PyTorch ≥ 1.6 default): ``<name>/data.pkl`` holds the object, ``<name>/data/<key>``
  each storage's raw bytes.

Both pickles are read by :class:`RestrictedUnpickler`, whose ``find_class`` admits only the few
globals a state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter`` and the storage type names), each mapped to a NumPy stand-in. Anything else
— ``os.system``, ``builtins.eval``, a model class — is refused with :class:`CheckpointError` before
it is looked up, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage type → NumPy dtype ("BFloat16" has none: read as uint16, widened to float32 below).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file and the reason."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only its dtype matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """A storage referred to by persistent id; its bytes are filled in after the object pickle."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int) -> None:
        self.key, self.type, self.numel = key, storage_type, numel
        self.array: np.ndarray | None = None


class _LazyTensor:
    """A tensor whose storage bytes arrive later (legacy format): materialised by :func:`_materialise`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise CheckpointError(f"storage {self.storage.key} has no data")
        count = int(np.prod(self.size)) if self.size else 1
        if count == 0:
            return np.zeros(self.size, dtype=flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.size or any(s < 0 for s in self.stride):
            raise CheckpointError(
                f"tensor of shape {self.size} (offset {self.offset}, stride {self.stride}) reaches past its "
                f"storage {self.storage.key} of {flat.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=tuple(s * flat.itemsize for s in self.stride)
        )
        array = np.array(view, copy=True)
        if self.storage.type.name == "BFloat16Storage":  # bf16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage: _Storage, storage_offset: int, size, stride, *_ignored) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor built from {type(storage).__name__}, not a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


# Every global a state dict may name, and what it becomes here. Nothing else is ever imported.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals of a state dict and PyTorch's storage ids."""

    def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refuses to load {module}.{name} — a state dict needs only tensors and "
                "dicts; this file asks for code to run (it is not a plain state dict, or it was tampered with)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self.source}: unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]  # pid[3]: the device it was saved from
        if isinstance(storage_type, str):  # very old files name the type as a string
            storage_type = _ALLOWED.get(("torch", storage_type))
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: storage {key} has unknown type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views (pre-0.4 checkpoints) are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type, int(numel))
        return self.storages[key]


def _unpickle(file: BinaryIO, source: str, storages: dict[str, _Storage] | None = None) -> Any:
    try:
        return RestrictedUnpickler(file, source, storages).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{source}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def _materialise(obj: Any, source: str) -> Any:
    """Replace every lazy tensor by its NumPy array; keep dicts, lists and plain values."""
    if isinstance(obj, _LazyTensor):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {k: _materialise(v, source) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, source) for v in obj)
    return obj


def _read_legacy(file: BinaryIO, source: str) -> Any:
    magic = _unpickle(file, source)
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (wrong magic number)")
    protocol = _unpickle(file, source)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported legacy protocol {protocol!r}")
    sys_info = _unpickle(file, source)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(f"{source}: written on a big-endian machine; not supported")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(file, source, storages)
    keys = _unpickle(file, source)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: storage key list missing")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"{source}: data for storage {key} that no tensor uses")
        header = file.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{source}: truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.type.dtype.itemsize
        if numel < 0 or numel != storage.numel:
            raise CheckpointError(f"{source}: storage {key} says {numel} elements, its tensors say {storage.numel}")
        data = file.read(nbytes)
        if len(data) < nbytes:
            raise CheckpointError(f"{source}: truncated in storage {key} ({len(data)} of {nbytes} bytes)")
        storage.array = np.frombuffer(data, dtype=storage.type.dtype)
    return _materialise(obj, source)


def _read_zip(path: Path, source: str) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise CheckpointError(f"{source}: zip checkpoint must hold one data.pkl, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError(f"{source}: big-endian checkpoint; not supported")
            storages: dict[str, _Storage] = {}
            obj = _unpickle(io.BytesIO(archive.read(pickles[0])), source, storages)
            for key, storage in storages.items():
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"{source}: storage {member} is missing from the archive")
                data = archive.read(member)
                nbytes = storage.numel * storage.type.dtype.itemsize
                if len(data) < nbytes:
                    raise CheckpointError(f"{source}: storage {member} has {len(data)} of {nbytes} bytes")
                storage.array = np.frombuffer(data[:nbytes], dtype=storage.type.dtype)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{source}: damaged zip checkpoint ({exc})") from None
    return _materialise(obj, source)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (legacy or zip format) as ``{name: float/int NumPy array}``.

    A checkpoint that wraps its state dict (``{"state_dict": ...}`` or ``{"model": ...}``) is
    unwrapped. Raises :class:`CheckpointError` for anything that is not a plain state dict.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file")
    if zipfile.is_zipfile(path):
        obj = _read_zip(path, source)
    else:
        with open(path, "rb") as file:
            if file.read(2)[:1] != b"\x80":
                raise CheckpointError(f"{source}: not a PyTorch checkpoint (neither zip nor pickle)")
            file.seek(0)
            obj = _read_legacy(file, source)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items()}
