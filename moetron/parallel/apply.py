"""parallelize(): the one place where training strategies are applied to the plain model.

Order (DESIGN.md): TP/SP -> EP -> CP -> activation checkpointing -> compile -> PP -> DP/ZeRO. This
release implements activation checkpointing, compilation and replicated data parallelism; the other
degrees are refused by `ParallelDims.validate` before anything is built.

Replicated data parallelism needs real tensors (DDP broadcasts rank 0's weights when it wraps), so it
is a separate step, `wrap_data_parallel`, taken after the model is materialized; the sharded
(ZeRO-3/FSDP) path of a later issue will shard on the meta device instead.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moetron.kernels.ops import SAVED_OPS
from moetron.parallel.mesh import ParallelMesh


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg) -> nn.Module:
    """Module transformations that work on the meta device. `cfg` is the TrainConfig."""
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if cfg.trainer.compile:
        for block in transformer_blocks(model):
            block.compile()
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (main layers and MTP blocks): the unit of checkpointing and compilation."""
    blocks = list(model.layers.values())
    blocks += [module.block for module in model.mtp]
    return blocks


# Outputs of these ops are kept by selective checkpointing; everything else (norms, activations,
# rotary embeddings, softmax of the reference attention) is recomputed in backward. Matmuls are
# where the FLOPs are, elementwise ops where the memory is (Korthikanti et al. 2022).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.aten, "_grouped_mm"):
    _SAVE_OPS.add(torch.ops.aten._grouped_mm.default)


def _selective_policy(ctx, op, *args, **kwargs):
    # SAVED_OPS: moetron's kernel forwards (FP8 linear layers, fused attention) as custom ops, registered as
    # their modules are imported (moetron/kernels/ops.py)
    saved = op in _SAVE_OPS or op in SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """mode "full": keep only each block's input and recompute the block in backward;
    "selective": keep the matmul outputs of each block and recompute the rest; "none"."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing={mode!r}; valid: 'none', 'full', 'selective'")
    kwargs = {"checkpoint_impl": CheckpointImpl.NO_REENTRANT}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, **kwargs)
    for module in model.mtp:
        module.block = checkpoint_wrapper(module.block, **kwargs)


def wrap_data_parallel(model: nn.Module, mesh: ParallelMesh, cfg) -> nn.Module:
    """DDP over the data-parallel group: gradients all-reduced in buckets while backward runs.

    Buffers are not broadcast: the routers' load counters are per rank (summed explicitly before the
    bias update) and the selection biases are updated identically everywhere."""
    if not mesh.distributed or mesh.dp_size == 1:
        return model
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model,
        process_group=mesh.group("dp"),
        device_ids=device_ids,
        bucket_cap_mb=cfg.parallel.dp_bucket_mb,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer under a DDP (or compile) wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model
