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

import json
import os
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from moetron.trainer.checkpoint_format import (
    INDEX,
    _fsync_dir,
    _join,
    _JsonIndexReader,
    _JsonIndexWriter,
    _read_json,
    _rng_state,
    _set_rng_state,
    _split,
    _write_json,
)

COMPLETE, STATE = "COMPLETE", "state.json"
_CHECKPOINT_NAME = re.compile(r"step_(\d{8})(\.replaced-[0-9a-f]+)?")  # a directory that counts if COMPLETE
_LEFTOVER_NAME = re.compile(r"step_\d{8}\.(tmp|replaced)-[0-9a-f]+")  # deleted after the next good save

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
