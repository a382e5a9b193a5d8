"""Subprocess half of tests/trainer/test_checkpoint.py (run as a script, never collected by pytest).

checkpoint_worker.py stall DIR REF {write|publish} SIGNAL
    save step 1 of a small model (its tensors also to REF, a safetensors file), then start saving step 2
    of a larger one and freeze, touching SIGNAL, either after DCP wrote its first tensor ("write") or
    after COMPLETE was written but before the rename ("publish"): the parent then SIGKILLs us.
checkpoint_worker.py gloo RANK WORLD PORT DIR
    one rank of a gloo job: a DDP model + AdamW + LambdaLR saved and loaded back with per-rank RNG
    states (sync), then an FSDP2-sharded model saved with async_save and loaded back; writes the random
    numbers drawn right after each save to DIR/draws_rank{RANK}.json for the parent to compare.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from safetensors.torch import save_file
from torch import nn

from moetron.trainer.checkpoint import CheckpointManager


def build(seed: int, width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    model(torch.randn(4, width)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def freeze(signal: Path) -> None:
    signal.touch()
    time.sleep(600)  # the parent kills us long before this ends


def stall(directory: Path, ref: Path, where: str, signal: Path) -> None:
    model, optimizer = build(seed=0, width=8, depth=2)
    train_step(model, optimizer, width=8)
    manager = CheckpointManager(directory, keep_last=3)
    manager.save(1, {"model": model, "optimizer": optimizer}, extra={"tag": "step one"})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ref))

    if where == "write":
        write_item = dcp_filesystem._write_item

        def write_then_freeze(*args, **kwargs):
            result = write_item(*args, **kwargs)
            freeze(signal)
            return result

        dcp_filesystem._write_item = write_then_freeze
    elif where == "publish":
        rename = os.rename

        def freeze_before_publishing(src, dst, *args, **kwargs):
            if ".tmp-" in Path(src).name and Path(dst).name == "step_00000002":
                freeze(signal)
            return rename(src, dst, *args, **kwargs)

        os.rename = freeze_before_publishing
    else:
        raise ValueError(f"where={where!r}: expected 'write' or 'publish'")
    big_model, big_optimizer = build(seed=1, width=256, depth=8)
    train_step(big_model, big_optimizer, width=256)
    manager.save(2, {"model": big_model, "optimizer": big_optimizer})
    raise AssertionError("the save of step 2 returned: it should have frozen")


def assert_same(a, b, where: str = "state") -> None:
    """Exact equality of nested state dicts, including container types (a tuple must stay a tuple)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def draw() -> list[float]:
    return torch.rand(3).tolist() + np.random.rand(3).tolist() + [random.random() for _ in range(3)]


def gloo(rank: int, world: int, port: int, directory: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    draws = {}

    # DDP + AdamW + LambdaLR, synchronous save; every rank has its own random streams
    model, optimizer = build(seed=0, width=8, depth=2)
    ddp = DistributedDataParallel(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)
    for _ in range(2):
        train_step(ddp, optimizer, width=8)
        scheduler.step()
    state = {"model": ddp, "optimizer": optimizer, "scheduler": scheduler}
    manager = CheckpointManager(directory / "ddp", keep_last=2)
    manager.save(2, state, extra={"step": 2})
    draws["ddp"] = draw()
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    saved["scheduler"] = scheduler.state_dict()
    train_step(ddp, optimizer, width=8), scheduler.step(), draw()
    assert manager.load(state) == {"step": 2}
    assert_same(draws["ddp"], draw(), "ddp draws")
    assert_same(
        saved, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    )

    # FSDP2: parameters are DTensors sharded over the two ranks; async save through the manager's gloo group
    model, _ = build(seed=0, width=8, depth=2)
    mesh = init_device_mesh("cpu", (world,))  # explicit: with a GPU present FSDP2 would otherwise pick CUDA
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(200 + rank), np.random.seed(200 + rank), random.seed(200 + rank)
    train_step(model, optimizer, width=8)
    assert isinstance(model[0].weight, DTensor)
    state = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(directory / "fsdp", async_save=True)
    manager.save(1, state)
    draws["fsdp"] = draw()
    saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # changing the live parameters before wait() must not leak into the checkpoint
    manager.wait()
    train_step(model, optimizer, width=8), draw()
    manager.load(state)
    assert_same(draws["fsdp"], draw(), "fsdp draws")
    assert_same(saved, {k: v.full_tensor() for k, v in model.state_dict().items()}, "fsdp model")

    (directory / f"draws_rank{rank}.json").write_text(json.dumps(draws))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "stall":
        stall(Path(args[0]), Path(args[1]), args[2], Path(args[3]))
    elif mode == "gloo":
        gloo(int(args[0]), int(args[1]), int(args[2]), Path(args[3]))
    else:
        raise SystemExit(f"mode={mode!r}: expected 'stall' or 'gloo'")
