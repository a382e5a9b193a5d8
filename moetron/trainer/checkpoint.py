"""Sharded, atomic, resumable checkpoints on torch.distributed.checkpoint (DCP).

One checkpoint is one directory; only a directory holding a COMPLETE marker counts:

    <directory>/step_00001000/
        __0_0.distcp, __1_0.distcp  the tensors (model, optimizer state), one file per rank, written by DCP
        .metadata                   DCP's own index of those files: a pickle, kept for DCP's tools, never read here
        index.json                  the same index as JSON: the only index `load` reads
        state.json                  everything that is not a tensor (optimizer hyper-parameters, scheduler,
                                    data loader, ...) and the caller's `extra`, written by rank 0
        rng_rank{r}.json            rank r's random streams: torch CPU, CUDA, numpy, Python `random`
        COMPLETE                    JSON {step, time, world_size}, written by rank 0 last

Atomic: a save writes into `step_XXXXXXXX.tmp-<token>`; once every rank is done (a barrier), rank 0 writes
COMPLETE and renames the directory. Replacing a step first moves the old one aside to
`step_XXXXXXXX.replaced-<token>`, which still counts while the plain name is missing, so no crash loses a
complete checkpoint. Leftover `.tmp-`/`.replaced-` directories and checkpoints beyond `keep_last` are deleted
only after a new checkpoint is complete (never at load: another job may be writing).

Never unpickle: DCP pickles every non-tensor it is given and, in torch 2.13, FileSystemReader reads its
`.metadata` with `pickle.load`. So only tensors go to DCP (non-tensors go to state.json), the writer also
writes its index as JSON, and the reader rebuilds DCP's Metadata from that JSON. Tensor bytes are read by DCP
with `torch.load(weights_only=True)`.

Async: `dcp.async_save` copies the tensors to CPU before returning (training may go on changing them) and
writes in a background thread. It runs its collectives in that thread, so with torch.distributed up and no
`process_group` given the manager makes its own gloo group (a CPU backend, which async save needs, and no
interleaving with training's collectives); without torch.distributed it saves with `no_dist`. The marker and
rename happen in `wait()`, or at the start of the next `save` or `load`. Every rank must make the same calls.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

COMPLETE, INDEX, STATE = "COMPLETE", "index.json", "state.json"
_CHECKPOINT_NAME = re.compile(r"step_(\d{8})(\.replaced-[0-9a-f]+)?")  # a directory that counts if COMPLETE
_LEFTOVER_NAME = re.compile(r"step_\d{8}\.(tmp|replaced)-[0-9a-f]+")  # deleted after the next good save
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


# ---- the manager -----------------------------------------------------------------------------------


class CheckpointManager:
    """Save and load `{"model": nn.Module, "optimizer": Optimizer | None, "scheduler": ..., ...}` by step.

    "model" and any other nn.Module go through DCP's get/set state dict helpers (so DDP/FSDP-wrapped modules
    and sharded optimizers work), "optimizer" together with "model"; any other entry needs
    `state_dict()`/`load_state_dict()`; None entries are skipped. Non-tensor state must be JSON-like and the
    same on every rank (rank 0 writes it). `directory` must be one path that all ranks see (a shared
    filesystem), written by one job at a time.
    """

    def __init__(self, directory: str | Path, keep_last: int | None = 3, async_save: bool = False, process_group=None):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
            raise ValueError(f"keep_last={keep_last!r}: expected an int >= 0, or 0/None to keep every checkpoint")
        self.directory = Path(directory)
        self.keep_last = keep_last or 0
        self.async_save = async_save
        self._distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self._distributed:
            raise ValueError(f"process_group={process_group!r} given but torch.distributed is not initialized")
        if async_save and self._distributed and process_group is None:
            process_group = dist.new_group(backend="gloo")  # collective: every rank builds its manager together
        self._group = process_group
        self.rank = dist.get_rank(process_group) if self._distributed else 0
        self.world_size = dist.get_world_size(process_group) if self._distributed else 1
        self._pending: tuple[int, Path, Any] | None = None  # (step, tmp dir, future) of an async save

    # -- public API --

    def save(self, step: int, state: dict, extra: dict | None = None) -> None:
        """Checkpoint `state` (objects, see the class docstring) and `extra` (JSON, the same on every rank:
        it comes back from `load` as JSON does, tuples as lists)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        rng = _rng_state()  # first, so nothing below can move the streams before they are recorded
        self.wait()
        try:
            json.dumps(extra, allow_nan=True)
        except TypeError as e:
            raise TypeError(f"extra must be JSON-serializable (dict/list/str/int/float/bool/None): {e}") from None
        tensors: dict[str, torch.Tensor] = {}
        encoded = {name: _split(value, name, tensors) for name, value in self._state_dicts(state).items()}

        tmp = self.directory / f"step_{step:08d}.tmp-{self._shared_token()}"
        tmp.mkdir(parents=True, exist_ok=True)
        _write_json(tmp / f"rng_rank{self.rank}.json", rng)
        if self.rank == 0:
            _write_json(tmp / STATE, {"state": encoded, "extra": extra})
        writer = _JsonIndexWriter(tmp)
        if self.async_save:
            future = dcp.async_save(
                tensors, storage_writer=writer, process_group=self._group, no_dist=not self._distributed
            )
            self._pending = (step, tmp, future)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is intended
                dcp.save(tensors, storage_writer=writer, process_group=self._group, no_dist=not self._distributed)
            self._publish(step, tmp)

    def wait(self) -> None:
        """Block until a pending async save is written, then mark it COMPLETE (a no-op when none is pending)."""
        if self._pending is not None:
            step, tmp, future = self._pending
            self._pending = None
            future.result()  # raises what the background save raised; its tmp dir is cleaned at the next save
            self._publish(step, tmp)

    def latest_step(self) -> int | None:
        """The newest step with a COMPLETE checkpoint, or None."""
        steps = self._complete_dirs()
        return max(steps) if steps else None

    def load(self, state: dict, step: int | None = None) -> dict:
        """Load checkpoint `step` (None: the newest complete one) into the objects of `state` in place and
        restore this rank's random streams; returns the `extra` given to `save`."""
        self.wait()
        if step is None:
            latest = self.latest_step()
            step = self._broadcast(-1 if latest is None else latest)  # rank 0 decides: listings may lag
            if step < 0:
                raise self._nothing_found()
        path = self._complete_dirs().get(step)
        if path is None:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; "
                f"complete steps: {sorted(self._complete_dirs()) or 'none'}"
            )
        saved = _read_json(path / STATE)
        tensors: dict[str, torch.Tensor] = {}
        state_dicts = self._state_dicts(state)
        for name, value in state_dicts.items():
            if name not in saved["state"]:
                raise KeyError(f"{path} has no entry {name!r}; it holds {sorted(saved['state'])}")
            _split(value, name, tensors)  # the tensors DCP loads into, in place
        self._check_matches(path, tensors, names=set(state_dicts))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                tensors, storage_reader=_JsonIndexReader(path), process_group=self._group, no_dist=not self._distributed
            )

        values = {name: _join(saved["state"][name], tensors) for name in state_dicts}
        model, optimizer = state.get("model"), state.get("optimizer")
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=values["model"], optim_state_dict=values["optimizer"])
        for name, obj in state.items():
            if obj is None or name == "optimizer" or (name == "model" and optimizer is not None):
                continue
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, values[name])
            else:
                obj.load_state_dict(values[name])

        rng_file = path / f"rng_rank{self.rank}.json"
        if rng_file.is_file():
            _set_rng_state(_read_json(rng_file), rng_file)
        else:
            warnings.warn(
                f"{rng_file} does not exist (saved with fewer ranks?): random streams not restored", stacklevel=2
            )
        return saved["extra"]

    # -- helpers --

    def _state_dicts(self, state: dict) -> dict[str, Any]:
        """The state dict of every non-None entry of `state`."""
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict of objects like {{'model': module, 'optimizer': opt}}, got {type(state).__name__}"
            )
        model, optimizer = state.get("model"), state.get("optimizer")
        if optimizer is not None and not isinstance(model, nn.Module):
            raise ValueError(f"state['optimizer'] needs state['model'] to be its nn.Module, got {type(model).__name__}")
        out = {}
        for name, obj in state.items():
            if not isinstance(name, str) or "." in name:
                raise ValueError(f"state key {name!r}: expected a str without '.' (it prefixes checkpoint keys)")
            if obj is None:
                continue
            if name == "optimizer":
                _, out[name] = get_state_dict(model, obj)
            elif isinstance(obj, nn.Module):
                out[name] = get_model_state_dict(obj)
            elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
                out[name] = obj.state_dict()
            else:
                raise TypeError(
                    f"state[{name!r}] is a {type(obj).__name__}, which has no state_dict()/load_state_dict()"
                )
        return out

    def _check_matches(self, path: Path, tensors: dict[str, torch.Tensor], names: set[str]) -> None:
        """Name every tensor that is missing, unexpected or of another shape before DCP fails less clearly."""
        saved = {k: v["size"] for k, v in _read_json(path / INDEX)["tensors"].items() if k.split(".")[0] in names}
        missing = sorted(set(tensors) - set(saved))
        unexpected = sorted(set(saved) - set(tensors))
        shapes = [
            f"{k}: checkpoint {tuple(saved[k])} vs {tuple(t.shape)}"
            for k, t in tensors.items()
            if k in saved and list(t.shape) != saved[k]
        ]
        labels = ("missing from the checkpoint", "in the checkpoint only", "shape mismatch")
        problems = [
            f"{label} ({len(keys)}): {keys[:10]}{' ...' if len(keys) > 10 else ''}"
            for label, keys in zip(labels, (missing, unexpected, shapes))
            if keys
        ]
        if problems:
            raise ValueError(f"checkpoint {path} does not match the objects to load into: " + "; ".join(problems))

    def _complete_dirs(self) -> dict[int, Path]:
        """{step: directory} of the complete checkpoints; a `.replaced-` copy counts only if its step has no other."""
        found: dict[int, Path] = {}
        if self.directory.is_dir():
            for entry in sorted(self.directory.iterdir()):
                match = _CHECKPOINT_NAME.fullmatch(entry.name)
                if match and (entry / COMPLETE).is_file():
                    if match[2] is None:
                        found[int(match[1])] = entry
                    else:
                        found.setdefault(int(match[1]), entry)
        return found

    def _nothing_found(self) -> FileNotFoundError:
        if not self.directory.is_dir():
            return FileNotFoundError(f"no checkpoint to load: {self.directory} does not exist")
        others = sorted(p.name for p in self.directory.iterdir() if p.name.startswith("step_"))
        found = f"found only incomplete ones (still being written, or died) {others}" if others else "found none"
        return FileNotFoundError(f"no complete checkpoint in {self.directory} (step_XXXXXXXX/{COMPLETE}): {found}")

    def _publish(self, step: int, tmp: Path) -> None:
        """After every rank has written: rank 0 marks `tmp` COMPLETE, renames it into place and cleans up."""
        self._barrier()
        if self.rank == 0:
            _write_json(tmp / COMPLETE, {"step": step, "time": time.time(), "world_size": self.world_size})
            _fsync_dir(tmp)
            final = self.directory / f"step_{step:08d}"
            if final.exists():  # replacing a step: the old copy still counts until the rename below
                os.rename(final, final.with_name(f"{final.name}.replaced-{tmp.name.rsplit('-', 1)[1]}"))
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._clean_up(keep=final)
        self._barrier()

    def _clean_up(self, keep: Path) -> None:
        """Delete leftover tmp/replaced directories and complete checkpoints beyond the newest `keep_last`."""
        complete = self._complete_dirs()  # a `.replaced-` copy that is its step's only one is kept
        doomed = [
            p for p in self.directory.iterdir() if _LEFTOVER_NAME.fullmatch(p.name) and p not in complete.values()
        ]
        if self.keep_last:
            newest_first = sorted(complete.items(), reverse=True)
            doomed += [p for _, p in newest_first[self.keep_last :] if p != keep]
        for path in doomed:
            (path / COMPLETE).unlink(missing_ok=True)  # first, so a half-deleted directory never counts
            shutil.rmtree(path, ignore_errors=True)

    def _shared_token(self) -> str:
        """A random name suffix that every rank agrees on (drawn from os.urandom: the RNG streams stay put)."""
        return f"{self._broadcast(secrets.randbits(32)):08x}"

    def _device(self) -> torch.device:
        nccl = self._distributed and dist.get_backend(self._group) == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _broadcast(self, value: int) -> int:
        if not self._distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.broadcast(tensor, group=self._group, group_src=0)
        return int(tensor.item())

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._group)
