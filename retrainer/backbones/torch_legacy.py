"""Read a PyTorch state_dict saved in the legacy (pre-zip, torch < 1.6) format, without torch.

Layout of such a file::

    pickle(MAGIC_NUMBER)   pickle(PROTOCOL_VERSION)   pickle(sys_info)
    pickle(obj)            # tensors are persistent ids ('storage', type, key, location, numel, view)
    pickle([storage keys]) # the order in which the raw storages follow
    for each key: <int64 LE element count> <count * element_size raw bytes>

Every one of the five pickles goes through a whitelisting unpickler: the header pickles and the
key list may name no global at all, the object pickle only a small fixed set
(``collections.OrderedDict``, torch's tensor rebuild helpers and storage classes, all replaced
by inert local stand-ins), so a hostile file cannot run code.
"""
from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WeightsUnavailable

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class -> (numpy dtype of the raw bytes, element size)
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 when the tensor is built
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage referenced by the pickle; its bytes are read after the object pickle."""

    def __init__(self, kind: _StorageType, key: str, numel: int) -> None:
        self.kind = kind
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageView:
    def __init__(self, root: _Storage, offset: int, size: int) -> None:
        self.root = root
        self.offset = offset
        self.size = size
        self.kind = root.kind


class _TensorRef:
    def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple) -> None:
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (numbers, strings, lists, dicts): any global or persistent id is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id is not allowed here in a weights file")


def _load_data(f: Any) -> Any:
    return _DataUnpickler(f).load()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel, view_metadata = pid
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _Storage(kind, str(key), int(numel))
        if view_metadata is not None:
            _view_key, offset, size = view_metadata
            return _StorageView(root, int(offset), int(size))
        return root


def _materialise(ref: _TensorRef) -> np.ndarray:
    storage = ref.storage
    base_offset = 0
    if isinstance(storage, _StorageView):
        base_offset, storage = storage.offset, storage.root
    flat = storage.data
    assert flat is not None
    n = int(np.prod(ref.size)) if ref.size else 1
    start = base_offset + ref.offset
    if n == 0:
        out = np.zeros(ref.size, dtype=flat.dtype)
    else:
        span = 1 + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
        if start < 0 or start + span > flat.size or any(st < 0 for st in ref.stride):
            raise ValueError("tensor reaches outside its storage")
        itemsize = flat.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            flat[start:], shape=ref.size, strides=tuple(st * itemsize for st in ref.stride)
        ).copy()
    if storage.kind.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    elif out.dtype.kind == "f":
        out = out.astype(np.float32)
    return np.asarray(out, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)


def _not_legacy(path: Path, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"{path} is not a legacy PyTorch weights file ({why}).",
        "Expected a state_dict saved by torch.save(..., _use_new_zipfile_serialization=False).",
    )


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format torch ``state_dict`` into ``{name: ndarray}`` (torch layout).

    Floating tensors come back as float32, integer tensors keep their dtype. Storage offsets,
    strides and shared storages are honoured. Anything that is not a legacy torch file raises
    :class:`~retrainer.errors.WeightsUnavailable`.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc.strerror or exc}.") from None
    with f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise _not_legacy(path, "it is a zip archive, the newer torch format")
        size = f.seek(0, 2)
        f.seek(0)
        storages: dict[str, _Storage] = {}
        try:
            if _load_data(f) != MAGIC_NUMBER:
                raise _not_legacy(path, "wrong magic number")
            version = _load_data(f)
            if version != PROTOCOL_VERSION:
                raise _not_legacy(path, f"unsupported protocol version {version!r}")
            sys_info = _load_data(f)
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise _not_legacy(path, "big-endian files are not supported")
            obj = _Unpickler(f, storages).load()
            keys = _load_data(f)
            if not isinstance(keys, (list, tuple)):
                raise ValueError("the storage key list is not a list")
            for key in keys:
                storage = storages.get(key)
                if storage is None:
                    raise ValueError(f"storage {key!r} is not referenced by any tensor")
                (count,) = struct.unpack("<q", f.read(8))
                dtype = storage.kind.dtype
                if count < 0 or count * dtype.itemsize > size - f.tell():
                    raise ValueError("the file is truncated")
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise ValueError("the file is truncated")
                storage.data = np.frombuffer(raw, dtype=dtype)
        except WeightsUnavailable:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, struct.error, MemoryError, ImportError,
                OverflowError, RecursionError) as exc:
            raise _not_legacy(path, f"{type(exc).__name__}: {exc}") from None

    if not isinstance(obj, dict):
        raise _not_legacy(path, f"it holds a {type(obj).__name__}, not a state_dict")
    missing = [s.key for s in storages.values() if s.data is None]
    if missing:
        raise _not_legacy(path, f"storage data missing for {len(missing)} storages")
    out: dict[str, np.ndarray] = {}
    try:
        for name, value in obj.items():
            if isinstance(value, _TensorRef):
                out[str(name)] = _materialise(value)
    except ValueError as exc:
        raise _not_legacy(path, str(exc)) from None
    if not out:
        raise _not_legacy(path, "it contains no tensors")
    return out
