"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules are multipliers of the peak lr as a function of the optimizer step (LambdaLR):
* cosine: linear warmup over `warmup_steps`, then half a cosine from 1 down to `min_lr_ratio`;
* wsd (warmup-stable-decay, Hu et al. 2024, MiniCPM): warmup, constant, then a linear decay to
  `min_lr_ratio` over the last `decay_fraction` of the steps (cheap to continue from the stable phase);
* constant: warmup, then 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, optim, device_type: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices (dim >= 2) except the embedding;
    none on norms, biases and the embedding (decaying a lookup table shrinks rare tokens only)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith("embed.weight")
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    fused = optim.fused if optim.fused is not None else device_type == "cuda"
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused or None)


def lr_multiplier(step: int, total_steps: int, optim) -> float:
    """Multiplier of the peak lr for the update made at optimizer step `step` (0-based)."""
    warmup = optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(optim.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, optim))
