"""The typed schema of a training run, registered in Hydra's ConfigStore, and its cross-field checks.

`configs/train.yaml` composes one `TrainConfig` from the groups `model`, `data`, `optim`, `parallel`,
`logging` and the `trainer` knobs. Hydra checks field names and types while merging YAML and
command-line overrides onto these dataclasses; `validate(cfg, world_size)` then checks what spans
fields (vocabulary vs tokenizer, parallel degrees vs world size and model shape, schedules vs steps)
and raises `ConfigError` naming the field, before any process group exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from moetron.model.config import ModelConfig


class ConfigError(ValueError):
    """An invalid training configuration; the message names the field and what would be valid."""


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin": Python's documentation, tokenized at start; "bin": prepared shards
    path: str | None = None  # source=bin: the directory written by `python -m moetron.data.prepare`
    vocab_size: int = 8192  # source=builtin: size of the byte-level BPE trained on the corpus
    val_fraction: float = 0.05  # source=builtin: share of documents held out for evaluation
    cache_dir: str = "~/.cache/moetron"  # where the built-in tokenizer is cached
    seq_len: int = 256
    micro_batch_size: int = 8
    seed: int = 1234  # data order; independent of the model's init seed


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine" (warmup + cosine), "wsd" (warmup-stable-decay), "constant"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the final share of steps that decays to min lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel; None: on CUDA


@dataclass
class ParallelConfig:
    dp: int = -1  # -1: whatever the world size leaves after tp * pp * cp
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp_bucket_mb: float = 25.0  # gradient all-reduce bucket size (DDP)


@dataclass
class LoggingConfig:
    log_every: int = 10
    console: bool = True
    jsonl: bool = True
    wandb: bool = True
    wandb_project: str = "moetron"
    wandb_entity: str | None = None
    wandb_name: str | None = None  # None: the run directory's name
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: str | None = None  # None: online with an API key, else offline


@dataclass
class KernelsConfig:
    backend: str | None = None  # attention: None (Triton for bf16/fp16 on CUDA), "torch", "sdpa", "triton"


@dataclass
class TrainerConfig:
    steps: int = 200
    grad_accum: int = 1  # micro-batches per optimizer step (per data-parallel rank)
    device: str = "auto"  # "auto": cuda if available, else cpu
    precision: str = "auto"  # "bf16" (autocast, fp32 master weights), "fp32"; "auto": bf16 on cuda
    seed: int = 0  # model init and per-rank RNG streams
    activation_checkpointing: str = "none"  # "none", "full" (every block), "selective" (keep matmul outputs)
    compile: bool = False  # torch.compile each block
    nan_policy: str = "skip"  # on a non-finite loss or gradient: "skip" the step, or "stop"
    max_skipped_steps: int = 20  # stop anyway after this many skipped steps in a row
    eval_every: int = 100  # 0: never
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0: only at the end
    save_final: bool = True  # a checkpoint after the last step (false: only the checkpoint_every ones)
    keep_last: int = 3
    async_checkpoint: bool = False
    resume: str = "auto"  # "auto": newest complete checkpoint in run_dir, "none", or a checkpoint directory
    run_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    peak_tflops: float | None = None  # per GPU, for MFU; None: looked up from the device name
    init_from: str | None = None  # a moetron or Hugging Face checkpoint directory to start from


@dataclass
class TrainConfig:
    # MISSING, not ModelConfig(): an instance would already hold the values __post_init__ derives from
    # the defaults (head_dim of d_model=512), and Hydra would merge the preset on top of those.
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Make the schema known to Hydra: `base_train` is the first entry of train.yaml's defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_train", node=TrainConfig)


def to_train_config(cfg: Any) -> TrainConfig:
    """A composed OmegaConf config -> TrainConfig (dataclasses, interpolations resolved).

    Constructing ModelConfig runs its own validation; its ValueError becomes a ConfigError."""
    from omegaconf import OmegaConf

    if isinstance(cfg, TrainConfig):
        return cfg
    try:
        obj = OmegaConf.to_object(cfg)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if not isinstance(obj, TrainConfig):
        raise ConfigError("the config was not composed onto the TrainConfig schema (train.yaml's `base_train`)")
    return obj


def _fail(name: str, msg: str) -> None:
    raise ConfigError(f"{name}: {msg}")


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        _fail(name, f"{value!r} is not one of {list(valid)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        _fail(name, f"{value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_fp8_device(model: ModelConfig, device: str) -> None:
    """FP8 on a CUDA GPU needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper and later). Elsewhere on
    CUDA the FP8 layers would fall back to their fp32 torch references (moetron.kernels.fp8), tens of times slower
    than bf16, so the run is refused. On the CPU (tests, debugging) the references are the intended path."""
    import torch

    if not model.fp8.enabled or device == "cpu" or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        _fail(
            "model.fp8.enabled",
            f"true needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or later); "
            f"{torch.cuda.get_device_name()} is {major}.{minor}: set model.fp8.enabled=false",
        )


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Cross-field checks of a whole run; raises ConfigError naming the field."""
    m, d, o, t, lg = cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.logging
    # data
    _choice("data.source", d.source, ("builtin", "bin"))
    _positive("data.seq_len", d.seq_len)
    _positive("data.micro_batch_size", d.micro_batch_size)
    if d.seq_len > m.max_seq_len:
        _fail("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if d.source == "builtin":
        if not 256 < d.vocab_size <= m.vocab_size:
            _fail("data.vocab_size", f"{d.vocab_size} must be in (256, model.vocab_size={m.vocab_size}]")
        if not 0 < d.val_fraction < 0.5:
            _fail("data.val_fraction", f"{d.val_fraction} must be in (0, 0.5)")
    else:
        if not d.path:
            _fail(
                "data.path", "is required with data.source=bin (a directory made by `python -m moetron.data.prepare`)"
            )
        meta = Path(d.path) / "meta.json"
        if not meta.is_file():
            _fail("data.path", f"{d.path} has no meta.json; make it with `python -m moetron.data.prepare`")
        vocab = json.loads(meta.read_text()).get("vocab_size", 0)
        if vocab > m.vocab_size:
            _fail("model.vocab_size", f"{m.vocab_size} is smaller than the data's vocabulary ({vocab}, {meta})")
    # optimizer
    _positive("optim.lr", o.lr)
    _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if o.warmup_steps >= t.steps and o.schedule != "constant":
        _fail("optim.warmup_steps", f"{o.warmup_steps} must be below trainer.steps={t.steps}")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"{o.min_lr_ratio} must be in [0, 1]")
    if not 0 < o.decay_fraction <= 1:
        _fail("optim.decay_fraction", f"{o.decay_fraction} must be in (0, 1]")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    for name, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= beta < 1:
            _fail(name, f"{beta} must be in [0, 1)")
    # trainer
    _positive("trainer.steps", t.steps)
    _positive("trainer.grad_accum", t.grad_accum)
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.precision", t.precision, ("auto", "bf16", "fp32"))
    _choice("trainer.activation_checkpointing", t.activation_checkpointing, ("none", "full", "selective"))
    _choice("trainer.nan_policy", t.nan_policy, ("skip", "stop"))
    for name in ("eval_every", "eval_batches", "checkpoint_every", "keep_last"):
        _positive(f"trainer.{name}", getattr(t, name), allow_zero=True)
    if t.resume not in ("auto", "none") and not Path(t.resume).exists():
        _fail("trainer.resume", f"{t.resume!r} is neither 'auto', 'none' nor an existing checkpoint directory")
    if t.init_from is not None and not Path(t.init_from).is_dir():
        _fail("trainer.init_from", f"{t.init_from!r} is not a directory")
    _check_fp8_device(m, t.device)
    if cfg.kernels.backend not in (None, "torch", "sdpa", "triton"):
        _fail("kernels.backend", f"{cfg.kernels.backend!r} is not one of [None, 'torch', 'sdpa', 'triton']")
    # logging
    _positive("logging.log_every", lg.log_every)
    if lg.wandb_mode is not None:
        _choice("logging.wandb_mode", lg.wandb_mode, ("online", "offline", "disabled"))
    # parallel layout
    from moetron.parallel.mesh import ParallelDims

    ParallelDims.from_config(cfg.parallel, world_size).validate(m, d)
