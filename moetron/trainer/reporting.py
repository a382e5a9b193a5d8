"""MetricsTracker: turns step results into the logged metrics (throughput, MFU, memory, MoE load)
and hands them to the sinks of `metrics.py` (console, metrics.jsonl, wandb) on rank 0.

Throughput is measured over each log interval (wall time between two log points, with the device
synchronized), so it includes everything a step costs: data, forward, backward, optimizer.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from moetron.parallel.mesh import ParallelMesh
from moetron.trainer.metrics import (
    StepMetrics,
    cuda_device_name,
    expert_load_histograms,
    expert_load_metrics,
    peak_memory_stats_gb,
    peak_tflops,
)
from moetron.trainer.sinks import build_logger


class MetricsTracker:
    def __init__(self, cfg, mesh: ParallelMesh, run_dir: Path, flops_per_token: float, device: torch.device):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.flops_per_token = flops_per_token
        self.world_size = mesh.dims.world_size
        name = cuda_device_name() if device.type == "cuda" else None
        self.peak = peak_tflops(name, override=cfg.trainer.peak_tflops)
        lg = cfg.logging
        wandb = None
        if lg.wandb:
            wandb = {
                "project": lg.wandb_project,
                "entity": lg.wandb_entity,
                "name": lg.wandb_name or Path(run_dir).name,
                "group": lg.wandb_group,
                "tags": list(lg.wandb_tags),
                "config": asdict(cfg),
                "run_dir": str(run_dir),
                "mode": lg.wandb_mode,
            }
        self.logger = build_logger(
            rank=mesh.rank,
            total_steps=cfg.trainer.steps,
            console=lg.console,
            print_every=1,
            jsonl_path=Path(run_dir) / "metrics.jsonl" if lg.jsonl else None,
            wandb=wandb,
        )
        self._interval_start = time.perf_counter()
        self._interval_tokens = 0
        self._skipped = 0

    def update(self, step: int, result, lr: float, plain) -> None:
        self._interval_tokens += result.tokens
        self._skipped += int(result.skipped)
        if step % self.cfg.logging.log_every and step != self.cfg.trainer.steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        speed = StepMetrics.compute(
            now - self._interval_start, self._interval_tokens, self.world_size, self.flops_per_token, self.peak
        )
        metrics = dict(result.losses)
        if result.grad_norm_embed is not None:
            metrics["grad_norm/embed"] = result.grad_norm_embed
        mem_peak, mem_reserved = peak_memory_stats_gb(self.device)  # (reserved: None on CPU)
        metrics.update(
            grad_norm=result.grad_norm,
            lr=lr,
            mem_peak_gb=mem_peak,
            mem_reserved_peak_gb=mem_reserved,
            skipped_steps=self._skipped,
            **speed.as_dict(),
        )
        stats = self._router_stats(result, plain)
        if stats:
            metrics.update(expert_load_metrics(stats))
        self.logger.log(step, metrics)
        if stats:
            self.logger.log_histograms(step, expert_load_histograms(stats))
        plain.reset_router_stats()
        self._interval_start, self._interval_tokens, self._skipped = time.perf_counter(), 0, 0

    @staticmethod
    def _router_stats(result, plain) -> dict:
        """The model's router statistics with the loads of the step summed over data-parallel ranks."""
        stats = plain.router_stats()
        for name, layer in stats.items():
            load = result.router_loads.get(f"{name}.router")
            if load is not None:
                layer["tokens_per_expert"] = load
                layer["max_over_mean_load"] = load.max() / load.mean().clamp(min=1e-9)
        return stats

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.logger.log(step, metrics)

    def close(self) -> None:
        self.logger.close()
