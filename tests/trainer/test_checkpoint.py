"""CheckpointManager: exact resume (model, optimizer, scheduler, RNG), atomicity under SIGKILL, retention,
2-rank gloo (DDP and FSDP2) with per-rank RNG, async save, clear errors, and loading without unpickling."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from moetron.trainer.checkpoint import CheckpointManager

WORKER = Path(__file__).with_name("checkpoint_worker.py")
REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("checkpoint_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
assert_same = worker.assert_same  # exact equality of nested state dicts, container types included


class TiedNet(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one parameter under two names

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def train(state: dict, steps: int) -> None:
    for _ in range(steps):
        tokens = torch.randint(0, 11, (4, 5))
        nn.functional.cross_entropy(state["model"](tokens).flatten(0, 1), tokens.flatten()).backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()
        state["scheduler"].step()


def snapshot(state: dict) -> dict:
    return copy.deepcopy({name: obj.state_dict() for name, obj in state.items()})


def draw() -> list[float]:
    return (
        torch.rand(4).tolist()
        + torch.randn(2).tolist()
        + np.random.rand(3).tolist()
        + [random.random(), random.gauss(0, 1)]
    )


def complete_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_roundtrip_restores_model_optimizer_scheduler_and_random_streams(tmp_path):
    state = make_state()
    train(state, steps=2)
    np.random.seed(1), random.seed(2), random.gauss(0, 1)  # a cached gaussian is part of `random`'s state
    manager = CheckpointManager(tmp_path)
    manager.save(2, state, extra={"data": {"epoch": 0, "position": 8}, "step": 2})
    saved, expected_draws = snapshot(state), draw()

    train(state, steps=3), draw()  # perturb everything
    assert state["scheduler"].state_dict()["last_epoch"] == 5
    extra = CheckpointManager(tmp_path).load(state)  # a fresh manager, as after a restart

    assert extra == {"data": {"epoch": 0, "position": 8}, "step": 2}
    assert_same(saved, snapshot(state))
    assert state["model"].head.weight is state["model"].embed.weight  # the tie survives
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert draw() == expected_draws


def test_load_into_fresh_objects_continues_training_identically(tmp_path):
    state = make_state(seed=0)
    train(state, steps=2)
    CheckpointManager(tmp_path).save(2, state)
    train(state, steps=2)
    reference = snapshot(state)

    fresh = make_state(seed=123)  # other weights, an optimizer that never stepped
    CheckpointManager(tmp_path).load(fresh)
    train(fresh, steps=2)  # the data comes from the restored torch RNG, so it is the same batch stream
    assert_same(reference, snapshot(fresh))


def test_latest_step_keep_last_leftovers_and_replacing_a_step(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest_step() is None
    state = make_state()
    leftover = tmp_path / "step_00000009.tmp-0badc0de"  # a save that died: ignored, then removed
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("{}")  # even a marker inside a tmp dir does not make it count
    for step in (1, 2):
        train(state, steps=1)
        manager.save(step, state, extra={"step": step})
        assert manager.latest_step() == step
    assert complete_names(tmp_path) == ["step_00000001", "step_00000002"]  # tmp dir gone after a good save

    train(state, steps=1)
    manager.save(3, state, extra={"step": 3})
    assert complete_names(tmp_path) == ["step_00000002", "step_00000003"]  # keep_last=2
    assert manager.load(make_state(), step=2) == {"step": 2}

    train(state, steps=1)
    replacement = snapshot(state)
    manager.save(3, state, extra={"step": 3, "again": True})  # the same step twice: replaced
    assert complete_names(tmp_path) == ["step_00000002", "step_00000003"]
    fresh = make_state(seed=5)
    assert manager.load(fresh) == {"step": 3, "again": True}
    assert_same(replacement, snapshot(fresh))

    # a crash between the two renames of a replacement leaves only the moved-aside copy: it still counts
    os.rename(tmp_path / "step_00000003", tmp_path / "step_00000003.replaced-12345678")
    assert manager.latest_step() == 3
    assert manager.load(make_state(seed=6)) == {"step": 3, "again": True}
    manager.save(4, state)
    assert complete_names(tmp_path) == ["step_00000003.replaced-12345678", "step_00000004"]  # keep_last=2

    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for step in range(4):
        keep_all.save(step, state)
    assert len(complete_names(tmp_path / "all")) == 4


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "nowhere").load(make_state())
    (tmp_path / "step_00000004.tmp-deadbeef").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*step_00000004\.tmp-deadbeef"):
        CheckpointManager(tmp_path).load(make_state())

    manager = CheckpointManager(tmp_path)
    manager.save(1, make_state())
    with pytest.raises(FileNotFoundError, match=r"step 7 .* complete steps: \[1\]"):
        manager.load(make_state(), step=7)

    class Wider(TiedNet):
        def __init__(self):
            super().__init__(dim=7)
            self.extra_layer = nn.Linear(2, 2)

    with pytest.raises(ValueError) as error:
        manager.load({"model": Wider()})
    message = str(error.value)
    assert "model.extra_layer.weight" in message and "model.hidden.weight: checkpoint (6, 6) vs (7, 7)" in message

    with pytest.raises(TypeError, match="extra must be JSON-serializable"):
        manager.save(2, make_state(), extra={"when": object()})
    with pytest.raises(TypeError, match=r"state\['data'\] is a list"):
        manager.save(2, {"data": [1, 2]})
    with pytest.raises(ValueError, match="keep_last=-1"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_load_never_unpickles(tmp_path, monkeypatch):
    state = make_state()
    train(state, steps=2)
    CheckpointManager(tmp_path).save(2, state)
    saved = snapshot(state)
    directory = tmp_path / "step_00000002"
    index = json.loads((directory / "index.json").read_text())
    assert index["tensors"] and all(set(v) == {"dtype", "size", "chunks"} for v in index["tensors"].values())
    (directory / ".metadata").unlink()  # DCP's pickled index: not needed by moetron

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    real_torch_load = torch.load

    def safe_torch_load(*args, weights_only=None, **kwargs):
        assert weights_only is True, "torch.load without weights_only=True during load"
        return real_torch_load(*args, weights_only=True, **kwargs)

    for name in ("load", "loads", "Unpickler", "_Unpickler", "_load", "_loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", safe_torch_load)
    train(state, steps=1)
    CheckpointManager(tmp_path).load(state)
    monkeypatch.undo()
    assert_same(saved, snapshot(state))


def test_async_save_marks_complete_only_when_written(tmp_path):
    state = make_state()
    train(state, steps=2)
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(2, state, extra={"step": 2})
    saved, expected_draws = snapshot(state), draw()
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(1.0)  # the tensors were staged before save() returned: this must not reach the checkpoint
    assert manager.latest_step() is None  # not COMPLETE before wait()
    manager.wait()
    assert manager.latest_step() == 2

    train(state, steps=1)
    manager.save(3, state)  # the next save finalizes a pending one first...
    manager.save(4, state)
    assert manager.latest_step() == 3
    draw()
    assert manager.load(state, step=2) == {"step": 2}  # ...and so does load
    assert manager.latest_step() == 4
    assert_same(saved, snapshot(state))
    assert draw() == expected_draws


@pytest.mark.parametrize("where", ["write", "publish"])
def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path, where):
    directory, ref, ready = tmp_path / "ckpt", tmp_path / "step1.safetensors", tmp_path / "frozen"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, str(WORKER), "stall", str(directory), str(ref), where, str(ready)],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"child exited early ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "child never reached the freeze point"
        time.sleep(0.05)
    tmp_dirs = list(directory.glob("step_00000002.tmp-*"))
    assert len(tmp_dirs) == 1
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()

    manager = CheckpointManager(directory)
    assert manager.latest_step() == 1
    model, optimizer = worker.build(seed=7, width=8, depth=2)  # the child's model, with other weights
    assert manager.load({"model": model, "optimizer": optimizer}) == {"tag": "step one"}
    assert_same(load_file(str(ref)), dict(model.state_dict()))

    manager.save(3, {"model": model, "optimizer": optimizer})
    assert complete_names(directory) == ["step_00000001", "step_00000003"]  # leftover tmp dir removed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_gloo_ddp_and_fsdp_with_per_rank_random_streams(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "gloo", str(rank), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(ranks):
        try:
            output = process.communicate(timeout=120)[0].decode()
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            pytest.fail(f"rank {rank} timed out")
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    draws = [json.loads((tmp_path / f"draws_rank{rank}.json").read_text()) for rank in range(2)]
    for phase in ("ddp", "fsdp"):
        assert draws[0][phase] != draws[1][phase], "the two ranks should have different random streams"
    for rank in range(2):
        assert (tmp_path / "ddp" / "step_00000002" / f"rng_rank{rank}.json").is_file()
    index = json.loads((tmp_path / "fsdp" / "step_00000001" / "index.json").read_text())
    assert len(index["tensors"]["model.0.weight"]["chunks"]) == 2  # FSDP2 saved each rank's shard
