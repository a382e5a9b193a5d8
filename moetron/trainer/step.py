"""One optimizer step: micro-batches with gradient accumulation, gradient sync, clipping, the NaN guard,
the optimizer and scheduler, and the MoE bias update.

Loss weighting. Every target token of the global batch (all data-parallel ranks, all micro-batches)
counts once: micro-batch i enters with weight n_i / N, where n_i is its number of targets and N the
global number. So 1 rank with accumulation A*dp and dp ranks with accumulation A give the same
gradients, whatever the padding (DDP averages over ranks, hence the factor dp_size in backward).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moetron.kernels.fp8_linear import clear_weight_caches
from moetron.model.transformer import IGNORE_INDEX
from moetron.parallel.mesh import ParallelMesh

LOSS_PARTS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient and the policy says stop."""


@dataclass
class StepResult:
    losses: dict[str, float]  # LOSS_PARTS, token-weighted means over the global batch
    grad_norm: float
    tokens: int  # input tokens processed by all ranks
    # The token embedding's share of grad_norm (before clipping; with a tied head, the head's too). Its rows'
    # gradients pass the first pre-norm, which divides them by the row's rms: a rare token's row, still near its
    # initial scale, can carry most of a gradient-norm spike (docs/fp8_performance.md, Convergence).
    grad_norm_embed: float | None = None
    skipped: bool = False
    problem: str | None = None  # why the step was skipped
    router_loads: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over data-parallel ranks


def train_step(
    model: nn.Module,
    plain: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    mesh: ParallelMesh,
    autocast,
    grad_clip: float,
    step: int,
) -> StepResult:
    """`model` is what to call (DDP-wrapped or not), `plain` the Transformer under it; `batches` this rank's
    micro-batches from the DataPipeline (on the device, ids checked and documents prepared on the host, so
    the forwards run with check_ids=False and no host sync); `autocast` a context factory."""
    device = batches[0]["input_ids"].device
    n_targets = [(b["labels"] != IGNORE_INDEX).sum() for b in batches]
    total = mesh.all_reduce_dp(torch.stack(n_targets).sum().float()).clamp(min=1)
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if ddp and not last else nullcontext():
            with autocast():
                out = model(batch["input_ids"], labels=batch["labels"], documents=batch["documents"], check_ids=False)
            weight = n_targets[i] / total
            (out.loss * weight * mesh.dp_size).backward()
        parts = [out.loss, out.lm_loss, out.mtp_loss, out.balance_loss]
        sums += (
            torch.stack([p.detach().float() if p is not None else torch.zeros((), device=device) for p in parts])
            * weight
        )
    losses_t = mesh.all_reduce_dp(sums)
    clear_weight_caches(plain)  # the micro-batches are done with this step's FP8 weight forms (model.fp8.cache_weights)

    params = [p for p in plain.parameters() if p.grad is not None]
    embed_grad = plain.embed.weight.grad  # (with a tied output head, the head's gradient too)
    embed_norms = [] if embed_grad is None else [torch.linalg.vector_norm(embed_grad.float())]  # before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    losses = dict(zip(LOSS_PARTS, losses_t.tolist()))
    grad_norm, *embed_norms = torch.stack([grad_norm.float(), *embed_norms]).tolist()  # one host sync for both
    embed_norm = embed_norms[0] if embed_norms else None
    tokens = sum(b["input_ids"].numel() for b in batches) * mesh.dp_size
    problem = _non_finite(losses, grad_norm)
    loads = _summed_loads(plain, mesh)
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        plain.reset_router_stats()
        return StepResult(losses, grad_norm, tokens, embed_norm, skipped=True, problem=f"step {step}: {problem}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    plain.update_expert_bias(loads)  # aux-loss-free balancing on the loads of all ranks
    return StepResult(losses, grad_norm, tokens, embed_norm, router_loads=loads)


def _summed_loads(plain: nn.Module, mesh: ParallelMesh) -> dict[str, torch.Tensor]:
    """Each router's tokens per expert of this step, summed over data-parallel ranks in one all-reduce."""
    routers = plain.routers()
    if not routers:
        return {}
    stacked = mesh.all_reduce_dp(torch.stack([r.load for r in routers.values()]))  # (n_routers, n_experts)
    return dict(zip(routers, stacked.unbind(0)))


def _non_finite(losses: dict[str, float], grad_norm: float) -> str | None:
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        return "non-finite " + ", ".join(f"{name}={losses[name]}" for name in bad)
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm} with finite losses ({', '.join(f'{k}={v:.4g}' for k, v in losses.items())})"
    return None


@torch.no_grad()
def evaluate(plain: nn.Module, batches, mesh: ParallelMesh, autocast) -> dict[str, float]:
    """Token-weighted mean language-model loss and perplexity over `batches` (this rank's share)."""
    was_training = plain.training
    plain.eval()
    sums = None
    for batch in batches:
        with autocast():
            out = plain(batch["input_ids"], labels=batch["labels"], documents=batch["documents"], check_ids=False)
        n = (batch["labels"] != IGNORE_INDEX).sum().float()
        part = torch.stack([out.lm_loss.float() * n, n])
        sums = part if sums is None else sums + part
    plain.train(was_training)
    if sums is None:
        return {}
    loss_sum, count = mesh.all_reduce_dp(sums).tolist()
    loss = loss_sum / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
