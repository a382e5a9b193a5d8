"""Kernel forwards as torch custom ops, so that dispatch modes see one op where a layer launches kernels.

torch's dispatcher sees Triton launches not at all: inside a layer's forward it sees only the small torch
ops around them (allocations, views, reshapes). Selective activation checkpointing
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`, used by `parallel/apply.py`) decides op by
op, from that stream, what to keep for the backward; it cannot keep the output of a kernel it does not
see, so it re-ran every FP8 linear layer (quantizers and GEMM) and the fused attention forward in the
backward, as full checkpointing would, and passed each of their small ops through its Python mode twice.

`dispatch_visible(name, fn)` registers `fn` as the custom op `moetron::name` and returns a function with
fn's signature that
* calls the op whenever a TorchDispatchMode is active (the checkpointing policy then sees one op, can
  keep its outputs, and the ops inside fn run below the mode, unseen);
* calls fn directly otherwise. A custom op call costs ~30 us of host time on the CPU machine (schema
  parsing, the aliasing check, boxing), and the small-model steps are bound by the host.

`fn` must be annotated for torch.library's schema inference and return fresh tensors (a list of them for
several outputs): outputs may not alias inputs or each other. The ops have no autograd formula; call them
inside an autograd.Function's forward. `SAVED_OPS` holds the OpOverloads whose outputs selective
checkpointing keeps (they hold the GEMM and attention work of a layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAVED_OPS: set[torch._ops.OpOverload] = set()


def dispatch_visible(name: str, fn: Callable) -> Callable:
    """Register fn as moetron::name and list it in SAVED_OPS (see the module docstring)."""
    op = torch.library.custom_op(f"moetron::{name}", mutates_args=())(fn)
    overload = getattr(torch.ops.moetron, name).default
    SAVED_OPS.add(overload)
    modes_active = torch._C._len_torch_dispatch_stack

    def call(*args):
        return op(*args) if modes_active() else fn(*args)

    call.__name__, call.__doc__, call.op = fn.__name__, fn.__doc__, overload
    return call


__all__ = ["SAVED_OPS", "dispatch_visible"]
