"""Write PyTorch-format checkpoints without PyTorch, for the reader's tests.

A pure-Python pickler (``pickle._Pickler``) whose ``Global`` objects are written as GLOBAL opcodes
by name, so the stream names ``torch._utils._rebuild_tensor_v2`` or ``torch.FloatStorage`` (or,
for the hostile fixture, ``os.system``) without those objects existing in this process.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage", np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


@dataclass(frozen=True)
class Global:
    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle wants a callable; it is only ever written by name
        raise TypeError(f"{self.module}.{self.name} is a name in a fixture, not a function")


@dataclass(eq=False)
class Storage:
    key: str
    data: np.ndarray  # 1-D


class Tensor:
    """A tensor view of a storage: ``storage.data[offset:]`` with ``size`` and element ``stride``."""

    def __init__(self, storage: Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class Call:
    """Pickles as ``module.name(*args)``: how a hostile file asks for code to run."""

    def __init__(self, fn: Global, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us add a type to its dispatch table
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_named_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = _save_named_global
    legacy = True

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            name = STORAGE_NAMES[obj.data.dtype]
            pid = ("storage", Global("torch", name), obj.key, "cpu", int(obj.data.size))
            return pid + (None,) if self.legacy else pid  # legacy ids end with the (unused) view metadata
        return None


def dumps(obj: Any, legacy: bool = True) -> bytes:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol=2)
    pickler.legacy = legacy
    pickler.dump(obj)
    return buffer.getvalue()


def as_tensors(arrays: Mapping[str, np.ndarray]) -> tuple[collections.OrderedDict, list[Storage]]:
    """One contiguous storage per array; a state dict of tensors over them."""
    state, storages = collections.OrderedDict(), []
    for i, (name, array) in enumerate(arrays.items()):
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        storage = Storage(str(i), array.reshape(-1))
        strides = tuple(s // array.itemsize for s in array.strides)
        state[name] = Tensor(storage, 0, tuple(array.shape), strides)
        storages.append(storage)
    return state, storages


def write_legacy(path: Path, obj: Any, storages: list[Storage]) -> Path:
    """PyTorch's legacy format: magic, protocol, sys info, object, storage keys, then raw storages."""
    with open(path, "wb") as file:
        file.write(dumps(0x1950A86A20F9469CFC6C))
        file.write(dumps(1001))
        file.write(dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
        file.write(dumps(obj))
        file.write(dumps([s.key for s in storages]))
        for storage in storages:
            file.write(struct.pack("<q", storage.data.size))
            file.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
    return path


def write_zip(path: Path, obj: Any, storages: list[Storage], folder: str = "archive") -> Path:
    """PyTorch's zip format: ``<folder>/data.pkl``, ``<folder>/data/<key>``, version and byte order."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{folder}/data.pkl", dumps(obj, legacy=False))
        archive.writestr(f"{folder}/byteorder", "little")
        archive.writestr(f"{folder}/version", "3\n")
        for storage in storages:
            archive.writestr(f"{folder}/data/{storage.key}", storage.data.tobytes())
    return path


def write_checkpoint(path: Path, arrays: Mapping[str, np.ndarray], fmt: str = "legacy") -> Path:
    """A state dict of ``arrays`` saved as PyTorch would (``fmt``: legacy or zip)."""
    state, storages = as_tensors(arrays)
    return (write_legacy if fmt == "legacy" else write_zip)(Path(path), state, storages)
