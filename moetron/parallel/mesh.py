"""ParallelMesh: the degrees of every parallel dimension, their validation, and the process groups.

A run on `world_size` ranks is laid out as a (pp, dp, cp, tp) grid, tensor parallelism innermost so
its heavy traffic stays inside a node. Expert parallelism does not add ranks: it shards the experts
over the dp x cp ranks (ep must divide dp * cp). `ParallelDims` is plain arithmetic and validation
(usable before any process group exists); `ParallelMesh` builds the DeviceMesh from it and is passed
explicitly to everything that communicates: there is no global process-group state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Degrees this release implements; the others are validated and refused until their issues land.
IMPLEMENTED = {"dp"}


class ParallelConfigError(ValueError):
    """Parallel degrees that do not fit the world size or the model; the message names the degree."""


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, parallel, world_size: int) -> ParallelDims:
        """`parallel` has fields dp (-1: inferred), tp, pp, cp, ep."""
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(parallel, name) < 1:
                raise ParallelConfigError(f"parallel.{name}={getattr(parallel, name)} must be >= 1")
        others = parallel.tp * parallel.pp * parallel.cp
        dp = parallel.dp
        if dp == -1:
            if world_size % others:
                raise ParallelConfigError(
                    f"parallel: world size {world_size} is not divisible by tp*pp*cp={others}; "
                    "choose degrees whose product divides the number of processes"
                )
            dp = world_size // others
        elif dp < 1:
            raise ParallelConfigError(f"parallel.dp={dp} must be >= 1, or -1 to use the remaining ranks")
        dims = cls(dp=dp, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, ep=parallel.ep)
        if dims.world_size != world_size:
            raise ParallelConfigError(
                f"parallel: dp*tp*pp*cp = {dp}*{dims.tp}*{dims.pp}*{dims.cp} = {dims.world_size} must equal "
                f"the world size {world_size} (set parallel.dp=-1 to infer dp)"
            )
        return dims

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def validate(self, model, data=None) -> None:
        """Divisibility by the model's shape, then refusal of degrees not implemented yet."""

        def fail(msg: str) -> None:
            raise ParallelConfigError(f"parallel: {msg}")

        if model.n_heads % self.tp:
            fail(f"tp={self.tp} must divide model.n_heads={model.n_heads}")
        if model.attention == "gqa" and model.n_kv_heads % self.tp:
            fail(f"tp={self.tp} must divide model.n_kv_heads={model.n_kv_heads}")
        if self.ep > 1:
            if not model.is_moe:
                fail(f"ep={self.ep} needs a MoE model (model.n_routed_experts > 0)")
            if model.n_routed_experts % self.ep:
                fail(f"ep={self.ep} must divide model.n_routed_experts={model.n_routed_experts}")
            if (self.dp * self.cp) % self.ep:
                fail(f"ep={self.ep} must divide dp*cp={self.dp * self.cp} (experts are sharded over those ranks)")
        if self.pp > model.n_layers:
            fail(f"pp={self.pp} exceeds model.n_layers={model.n_layers} (every stage needs a layer)")
        if data is not None and self.cp > 1 and data.seq_len % (2 * self.cp):
            fail(f"cp={self.cp}: data.seq_len={data.seq_len} must be divisible by 2*cp (load-balanced chunks)")
        pending = [f"{name}={getattr(self, name)}" for name in ("tp", "pp", "cp", "ep") if getattr(self, name) > 1]
        if pending:
            fail(
                f"{', '.join(pending)}: only data parallelism is implemented in this release "
                "(tensor, pipeline, context and expert parallelism arrive with their own issues); "
                "set them to 1"
            )


class ParallelMesh:
    """The DeviceMesh of a run and the groups and coordinates derived from it."""

    def __init__(self, dims: ParallelDims, device_type: str):
        self.dims = dims
        self.device_type = device_type
        if dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh

            shape = (dims.pp, dims.dp, dims.cp, dims.tp)
            self.device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "cp", "tp"))
            self.rank = dist.get_rank()
        else:  # a single process without torch.distributed
            if dims.world_size != 1:
                raise ParallelConfigError(f"{dims} needs {dims.world_size} processes; launch with torchrun")
            self.device_mesh = None
            self.rank = 0

    @property
    def distributed(self) -> bool:
        return self.device_mesh is not None

    def group(self, dim: str):
        """Process group of one mesh dimension ("dp", "tp", "pp", "cp"); None without torch.distributed."""
        return self.device_mesh.get_group(dim) if self.device_mesh is not None else None

    def local_rank(self, dim: str) -> int:
        return self.device_mesh.get_local_rank(dim) if self.device_mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def all_reduce_dp(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the data-parallel group (a no-op on one rank)."""
        if self.distributed and self.dims.dp > 1:
            dist.all_reduce(tensor, op=op, group=self.group("dp"))
        return tensor

    def seed(self, base: int) -> int:
        """Per-rank seed for dropout-like randomness: different on every rank, reproducible per run.
        (Model initialization uses `base` itself so every rank starts from the same weights.)"""
        return base + 1000003 * self.rank

    def __repr__(self) -> str:
        return f"ParallelMesh({self.dims}, device={self.device_type}, rank={self.rank})"
