"""Learning-rate schedules and AdamW parameter groups."""

import math
from types import SimpleNamespace

import pytest
import torch

from moetron.model import ModelConfig, Transformer
from moetron.trainer.optim import build_optimizer, build_scheduler, lr_multiplier


def optim(**kw):
    base = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine", decay_fraction=0.2, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, fused=None)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_cosine_schedule():
    o = optim()
    assert [lr_multiplier(s, 110, o) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_multiplier(10, 110, o) == pytest.approx(1.0)
    mid = 10 + 99 / 2
    assert lr_multiplier(int(mid), 110, o) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_multiplier(109, 110, o) == pytest.approx(0.1)  # ends exactly at the floor
    values = [lr_multiplier(s, 110, o) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule():
    o = optim(schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    values = [lr_multiplier(s, 100, o) for s in range(100)]
    assert values[9] == 1.0 and all(v == 1.0 for v in values[10:80])
    assert values[80] == pytest.approx(1 - 1 / 20) and values[99] == pytest.approx(0.0)


def test_constant_schedule_and_scheduler_drives_optimizer():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    sched = build_scheduler(opt, 50, optim(schedule="constant", warmup_steps=2))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_weight_decay_only_on_matrices_not_embeddings_or_norms():
    model = Transformer(ModelConfig.from_preset("tiny", attention_bias=True))
    opt = build_optimizer(model, optim(), "cpu")
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names and "norm.weight" in no_decay_names
    assert "layers.0.attn.q_proj.bias" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
