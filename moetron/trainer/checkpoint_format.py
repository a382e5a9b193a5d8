"""The on-disk pieces of a moetron checkpoint, without the save/load protocol (that is checkpoint.py):

* state dicts split into tensors (for DCP) and a JSON outline of everything else (`_split`/`_join`);
* DCP's index (its Metadata) written and read as JSON instead of a pickle (`_JsonIndexWriter/Reader`);
* the random streams of a rank (torch CPU/CUDA, numpy, Python) as JSON;
* small durable-file helpers (atomic JSON writes, directory fsync).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo  # what the reader expects
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

INDEX = "index.json"  # DCP's index as JSON, the only index a load reads
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # tags of the JSON encoding of a state dict


# ---- state dicts as DCP tensors + JSON -------------------------------------------------------------


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of `value`: each tensor goes into `tensors[key path]` and leaves a {"__tensor__": key} stub."""
    if isinstance(value, torch.Tensor):  # DTensor included: DCP saves its shards
        if key in tensors:
            raise ValueError(f"two tensors flatten to the same checkpoint key {key!r}; rename a state dict entry")
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        keys = list(value)
        if all(isinstance(k, str) for k in keys) and not (len(keys) == 1 and keys[0] in (_TENSOR, _TUPLE, _ITEMS)):
            return {k: _split(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[_split(k, key, {}), _split(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot checkpoint {key!r} of type {type(value).__name__}: a state dict may hold only tensors, "
        "dicts, lists, tuples, str, int, float, bool and None"
    )


def _join(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_split`: the state dict, with each tensor stub replaced by `tensors[key]`."""
    if isinstance(encoded, list):
        return [_join(v, tensors) for v in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if len(encoded) == 1:
        ((tag, inner),) = encoded.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_join(v, tensors) for v in inner)
        if tag == _ITEMS:
            return {_join(k, tensors): _join(v, tensors) for k, v in inner}
    return {k: _join(v, tensors) for k, v in encoded.items()}


# ---- DCP's index (Metadata) as JSON ----------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"checkpoint index names an unknown dtype {name!r}")
    return dtype


def _as_list(value) -> list | None:
    return None if value is None else list(value)


def _index_to_json(metadata: Metadata) -> dict:
    tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise TypeError(f"checkpoint entry {key!r} is {type(item).__name__}, but only tensors may go to DCP")
        tensors[key] = {
            "dtype": str(item.properties.dtype).removeprefix("torch."),
            "size": list(item.size),
            "chunks": [[list(chunk.offsets), list(chunk.sizes)] for chunk in item.chunks],
        }
    # one record per stored chunk: [key, chunk offset, file, byte offset, byte length, stream transforms]
    storage = [
        [index.fqn, _as_list(index.offset), info.relative_path, info.offset, info.length]
        + [_as_list(info.transform_descriptors)]
        for index, info in metadata.storage_data.items()
    ]
    return {
        "version": metadata.version,
        "tensors": tensors,
        "planner_data": {key: list(path) for key, path in (metadata.planner_data or {}).items()},
        "storage": storage,
    }


def _index_from_json(encoded: dict) -> Metadata:
    tensors = {
        key: TensorStorageMetadata(
            properties=TensorProperties(dtype=_dtype(item["dtype"])),
            size=torch.Size(item["size"]),
            chunks=[ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes in item["chunks"]],
        )
        for key, item in encoded["tensors"].items()
    }
    storage = {MetadataIndex(key, offset): _StorageInfo(*info) for key, offset, *info in encoded["storage"]}
    return Metadata(
        state_dict_metadata=tensors,
        planner_data={key: tuple(path) for key, path in encoded["planner_data"].items()},
        storage_data=storage,
        storage_meta=StorageMeta(),
        version=encoded["version"],
    )


class _JsonIndexWriter(FileSystemWriter):
    """DCP's FileSystemWriter that also writes its index as JSON (the pickled `.metadata` is kept for tools)."""

    def finish(self, metadata: Metadata, results) -> None:
        super().finish(metadata, results)  # writes .metadata; fills in `metadata` in torch 2.13, a copy in 2.11
        storage = {result.index: result.storage_data for per_rank in results for result in per_rank}
        metadata = dataclasses.replace(metadata, storage_data=storage, version=CURRENT_DCP_VERSION)
        _write_json(Path(self.path) / INDEX, _index_to_json(metadata))


class _JsonIndexReader(FileSystemReader):
    """DCP's FileSystemReader that reads the JSON index instead of unpickling `.metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = _index_from_json(_read_json(Path(self.path) / INDEX))
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- random streams --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rng_state() -> dict:
    """This process's random streams: torch CPU, CUDA, numpy's global RNG, Python's `random`."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    # CUDA: the current device's generator, once CUDA is in use (each rank drives one device; asking every
    # device would create a context on each of them)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": _b64(torch.cuda.get_rng_state().numpy().tobytes()) if cuda else None,
        "numpy": [name, _b64(keys.astype("<u4").tobytes()), pos, has_gauss, cached_gaussian],
        "python": [version, list(internal), gauss_next],
    }


def _set_rng_state(state: dict, source: Path) -> None:
    def as_bytes(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(as_bytes(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_bytes(state["cuda"]))
    elif state["cuda"] is not None:
        warnings.warn(f"{source} holds a CUDA RNG state but CUDA is not available: not restored", stacklevel=3)
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (name, np.frombuffer(base64.b64decode(keys), dtype="<u4").copy(), pos, has_gauss, cached_gaussian)
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- files -----------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it, so a marker written later never points at a half-written file."""
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
