"""Trainer: builds a run in a fixed order and fits it.

build: model on the meta device -> parallelize -> materialize and initialize (same seed on every
rank) -> data parallelism -> optimizer and schedule -> data -> checkpoints (resume) -> metrics.
fit: for each step, micro-batches -> `train_step` -> metrics -> evaluation -> checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from moetron.config import TrainConfig
from moetron.model import Transformer
from moetron.model.counting import training_flops_per_token
from moetron.parallel.apply import parallelize, unwrap, wrap_data_parallel
from moetron.parallel.mesh import ParallelMesh
from moetron.trainer.checkpoint import CheckpointManager
from moetron.trainer.data import DataPipeline
from moetron.trainer.optim import build_optimizer, build_scheduler
from moetron.trainer.reporting import MetricsTracker
from moetron.trainer.step import NonFiniteError, evaluate, train_step


class Trainer:
    def __init__(self, cfg: TrainConfig, mesh: ParallelMesh, run_dir: str | Path):
        self.cfg, self.mesh, self.run_dir = cfg, mesh, Path(run_dir)
        self.callbacks = []  # called as fn(trainer, step, result) after every optimizer step
        self.step = 0
        self.stop_requested = False  # set by request_stop(): fit() ends after the current step
        self._build()

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.device = _device(t.device, self.mesh)
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision == "bf16":
            self.autocast = partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model_cfg = cfg.model
        if cfg.kernels.backend is not None:
            model_cfg = dataclasses.replace(model_cfg, attention_backend=cfg.kernels.backend)
        with torch.device("meta"):
            model = Transformer(model_cfg)
        model = parallelize(model, self.mesh, cfg)
        model.to_empty(device=self.device)
        self.plain: Transformer = unwrap(model)
        self.plain.init_weights()
        if t.init_from:
            self._load_pretrained(t.init_from)
        self.model = wrap_data_parallel(model, self.mesh, cfg)
        self.model.train()
        torch.manual_seed(self.mesh.seed(t.seed))  # from here on, each rank has its own random stream

        self.optimizer = build_optimizer(self.plain, cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        self.data = DataPipeline(cfg.data, cfg.model, self.mesh, seed=cfg.data.seed)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)

        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=t.keep_last, async_save=t.async_checkpoint,
            process_group=self.mesh.group("dp") if self.mesh.distributed else None,
        )  # fmt: skip
        self._resume()
        self.metrics = MetricsTracker(cfg, self.mesh, self.run_dir, self.flops_per_token, self.device)

    def _load_pretrained(self, path: str) -> None:
        from moetron.model.hf import from_hf
        from moetron.model.io import load_moetron

        source = Path(path)
        loaded = load_moetron(source) if (source / "config.yaml").exists() else from_hf(source)
        missing, unexpected = self.plain.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"trainer.init_from={path}: its model does not match model=...: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}; use the model preset the checkpoint was made with"
            )

    def _state(self) -> dict:
        return {"model": self.plain, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def _resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return
        manager = self.checkpoints if resume == "auto" else CheckpointManager(Path(resume).parent)
        step = manager.latest_step() if resume == "auto" else _step_of(resume)
        if step is None:
            return
        extra = manager.load(self._state(), step=step)
        self.step = int(extra["step"])
        self.data.load_state_dict(extra["data"])
        if self.mesh.rank == 0:
            print(f"resumed from {manager.directory} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ fit
    def fit(self) -> None:
        t = self.cfg.trainer
        skipped_in_a_row = 0
        try:
            while self.step < t.steps and not self.stop_requested:
                batches = [self.data.next_train_batch(self.device) for _ in range(t.grad_accum)]
                result = train_step(
                    self.model, self.plain, batches, self.optimizer, self.scheduler, self.mesh, self.autocast,
                    self.cfg.optim.grad_clip, self.step + 1,
                )  # fmt: skip
                self.step += 1
                if result.skipped:
                    skipped_in_a_row += 1
                    self._handle_non_finite(result.problem, skipped_in_a_row)
                else:
                    skipped_in_a_row = 0
                self.metrics.update(self.step, result, self.scheduler.get_last_lr()[0], self.plain)
                if t.eval_every and self.step % t.eval_every == 0:
                    self.metrics.log_eval(self.step, self.evaluate())
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save()
                for callback in self.callbacks:
                    callback(self, self.step, result)
            if t.save_final and (not t.checkpoint_every or self.step % t.checkpoint_every):
                self.save()
            self.checkpoints.wait()
        finally:
            self.metrics.close()

    def request_stop(self) -> None:
        """End fit() after the current step, as if it were the last (a callback's way to stop a run early,
        e.g. at a time budget); the final checkpoint follows trainer.save_final."""
        self.stop_requested = True

    def evaluate(self) -> dict[str, float]:
        """The held-out loss and perplexity now ({"eval/loss", "eval/perplexity"}; {} without a validation
        split), over trainer.eval_batches batches of the validation stream, the same batches every call."""
        batches = self.data.eval_batches(self.cfg.trainer.eval_batches, self.device)
        return evaluate(self.plain, batches, self.mesh, self.autocast)

    def _handle_non_finite(self, problem: str, in_a_row: int) -> None:
        t = self.cfg.trainer
        if t.nan_policy == "stop":
            raise NonFiniteError(f"{problem}; stopping (trainer.nan_policy=stop)")
        if in_a_row > t.max_skipped_steps:
            raise NonFiniteError(f"{problem}; {in_a_row} steps in a row skipped (trainer.max_skipped_steps)")
        if self.mesh.rank == 0:
            print(f"warning: skipped the update of {problem} (trainer.nan_policy=skip)", flush=True)

    def save(self) -> None:
        extra = {"step": self.step, "data": self.data.state_dict(), "config": _jsonable(asdict(self.cfg))}
        self.checkpoints.save(self.step, self._state(), extra=extra)


def _device(name: str, mesh: ParallelMesh) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _step_of(checkpoint_dir: str) -> int:
    name = Path(checkpoint_dir).name
    if not name.startswith("step_"):
        raise ValueError(f"trainer.resume={checkpoint_dir!r} is not a step_NNNNNNNN checkpoint directory")
    return int(name.removeprefix("step_"))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
