"""GPU timing for the benchmarks: the median time of one call (CUDA events), how many calls fill a window,
and where a call's GPU time goes by kernel (torch.profiler)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of one call of `fn`: CUDA events around each call on the GPU (no L2 flush
    between calls), perf_counter on the CPU (wiring smoke tests only)."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    fn()
    estimate = estimate_ms(fn, 3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = min(max(int(rep_ms / estimate), 20), 2000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def estimate_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of `fn` on the GPU from `calls` back-to-back calls (at least 1 us): how many calls
    fill a warm-up or a timing window."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end) / calls, 1e-3)


def kernel_breakdown_us(fn: Callable[[], object], calls: int = 5) -> dict[str, float]:
    """GPU microseconds per call of `fn` by kernel (name cut to 60 characters), from torch.profiler over `calls`
    calls, largest first; "busy" is their sum. Where a call's time goes: GEMMs, quantizers, casts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            name = e.name[:60]
            per[name] = per.get(name, 0.0) + e.time_range.elapsed_us() / calls
    out = {"busy": round(sum(per.values()), 1)}
    out.update((k, round(v, 1)) for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
    return out
