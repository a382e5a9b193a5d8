"""Training metrics: peak FLOP/s, throughput and MFU, memory, MoE load balance.

Computing:
* `peak_tflops(device_name)`: dense bf16 tensor-core peak of a GPU model, for MFU.
* `StepMetrics.compute(...)`: tokens/s (global and per GPU), achieved TFLOP/s per GPU and MFU.
* `peak_memory_stats_gb()`: peak CUDA memory allocated and reserved since the last call (the process's max RSS
  on CPU).
* `expert_load_metrics(router_stats)`: MoE load balance as flat scalars;
  `expert_load_histograms(router_stats)`: tokens per expert, for wandb only.

The sinks these metrics go to (console, metrics.jsonl, wandb) are in `sinks.py`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping

import torch

# ----------------------------------------------------------------------------- peak FLOP/s
# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s per GPU, from the vendors' datasheets.
# NVIDIA's tables print the "with sparsity" figure; the dense one is half of it:
#   H100 SXM 1979 -> 989, H100 PCIe 1513 -> 756, H100 NVL 1671 -> 835 (H100 datasheet);
#   H200 SXM 1979 -> 989, H200 NVL 1671 -> 835 (H200 datasheet); H800 as H100; H20 148 dense;
#   A100/A800 312 dense (A100 datasheet); L40S 733 -> 362, L40 362 -> 181, L4 242 -> 121;
#   A10G 70 (the figure quoted for AWS G5; NVIDIA publishes none); B200 4500 -> 2250 (HGX B200),
#   GB200 5000 -> 2500 per GPU (GB200 NVL72); AMD MI300X / MI325X 1307 dense (CDNA3 datasheets).
# Keys are substrings of torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM
# part); the longest key contained in the name wins, so "H100 PCIe" beats "H100", "H200" beats
# "H20", "L40S" beats "L40" and "L4", "GB200" beats "B200", whatever the order below.
# fmt: off
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,  # bare "H100": SXM5
    "H200": 989.0, "H200 NVL": 835.0, "GH200": 989.0, "H800": 989.0, "H800 PCIe": 756.0, "H20": 148.0,
    "A100": 312.0, "A800": 312.0, "A10G": 70.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "B200": 2250.0, "GB200": 2500.0, "MI300X": 1307.0, "MI325X": 1307.0,
}
# fmt: on


def cuda_device_name() -> str | None:
    """Name of the current CUDA device, or None without one (CPU)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of one GPU, or None when unknown (CPU, a model not in the table).
    `override` (the config's `peak_tflops`) wins when given."""
    if override is not None:
        if not (isinstance(override, (int, float)) and override > 0):
            raise ValueError(f"peak_tflops override must be a positive TFLOP/s figure, got {override!r}")
        return float(override)
    if not device_name:
        return None
    name = device_name.lower()
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


# ----------------------------------------------------------------------------- throughput, memory
@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """Throughput of one step, or of a log interval (pass its total time and tokens)."""

    tokens_per_sec: float  # global, all GPUs
    tokens_per_sec_per_gpu: float
    tflops_per_gpu: float  # achieved model FLOP/s (training FLOPs per token x tokens/s), in TFLOP/s
    mfu: float | None  # tflops_per_gpu / peak, a fraction; None when the peak is unknown

    @classmethod
    def compute(
        cls,
        step_time_s: float,
        tokens: int | float,
        world_size: int,
        flops_per_token: float,
        peak_tflops_per_gpu: float | None = None,
    ) -> StepMetrics:
        """`tokens` counts every GPU's tokens; `flops_per_token` is forward + backward
        (moetron.model.counting.training_flops_per_token)."""
        if not step_time_s > 0:
            raise ValueError(f"step_time_s must be > 0 seconds, got {step_time_s!r}")
        if not tokens >= 0:
            raise ValueError(f"tokens must be >= 0, got {tokens!r}")
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size must be an int >= 1 (number of GPUs), got {world_size!r}")
        if not flops_per_token >= 0:
            raise ValueError(f"flops_per_token must be >= 0, got {flops_per_token!r}")
        if peak_tflops_per_gpu is not None and not peak_tflops_per_gpu > 0:
            raise ValueError(f"peak_tflops_per_gpu must be > 0 or None (unknown), got {peak_tflops_per_gpu!r}")
        tokens_per_sec = tokens / step_time_s
        per_gpu = tokens_per_sec / world_size
        tflops = flops_per_token * per_gpu / 1e12
        mfu = None if peak_tflops_per_gpu is None else tflops / peak_tflops_per_gpu
        return cls(tokens_per_sec, per_gpu, tflops, mfu)

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


def peak_memory_stats_gb(device: torch.device | str | None = None, reset: bool = True) -> tuple[float, float | None]:
    """(peak allocated, peak reserved) in GiB (2**30 bytes) since the last reset, both reset when `reset` (call
    once per log interval). Reserved is what the caching allocator holds from the GPU, allocated or cached: the
    number that decides whether another allocation, or another process, still fits (on an H100 a deepseek_v3_mini
    process held 44-45 GiB of the GPU with at most ~34 GiB allocated). On CPU: (the process's max resident set
    size, which only grows (the OS has no reset), None)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak, reserved
    return _max_rss_gb(), None


def _max_rss_gb() -> float:
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return float("nan")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- MoE load balance
_ROUTER_STAT_KEYS = ("tokens_per_expert", "max_over_mean_load", "expert_bias", "dropped_tokens")


def _check_router_stats(router_stats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for layer, stats in router_stats.items():
        missing = [key for key in _ROUTER_STAT_KEYS if key not in stats]
        if missing:
            raise KeyError(f"router_stats[{layer!r}] lacks {missing}; each MoE layer needs {list(_ROUTER_STAT_KEYS)}")


def expert_load_metrics(router_stats: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Flat scalars from `Transformer.router_stats()`: max/mean expert load (1.0 = balanced)
    averaged over MoE layers, of the worst layer and per layer; dropped assignments summed over
    layers; mean |selection bias| over all experts of all layers. Empty without MoE layers."""
    if not router_stats:
        return {}
    _check_router_stats(router_stats)
    per_layer = {f"moe/{layer}/max_over_mean_load": float(s["max_over_mean_load"]) for layer, s in router_stats.items()}
    loads = list(per_layer.values())
    bias = torch.cat([s["expert_bias"].detach().float().flatten().cpu() for s in router_stats.values()])
    return {
        "moe/max_over_mean_load": sum(loads) / len(loads),
        "moe/max_over_mean_load_max": max(loads),
        **per_layer,
        "moe/dropped_tokens": sum(float(s["dropped_tokens"]) for s in router_stats.values()),
        "moe/bias_abs_mean": bias.abs().mean().item(),
    }


def expert_load_histograms(
    router_stats: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, tuple[list[float], list[int]]]:
    """Per MoE layer, tokens per expert as a histogram whose bin i is expert i:
    `{"moe/<layer>/tokens_per_expert": (counts, bin_edges 0..n_experts)}` (numpy.histogram's
    shape, which `WandbSink.log_histograms` hands to wandb.Histogram). Kept out of the JSONL."""
    _check_router_stats(router_stats)
    histograms = {}
    for layer, stats in router_stats.items():
        counts = stats["tokens_per_expert"].detach().float().flatten().cpu().tolist()
        histograms[f"moe/{layer}/tokens_per_expert"] = (counts, list(range(len(counts) + 1)))
    return histograms
