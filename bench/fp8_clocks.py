"""Are back-to-back FP8 GEMMs limited by the GPU's clock? Sustained throughput next to the SM clock and power.

bench/fp8.py times `fp8_gemm` at 0.90-0.98x cuBLAS's rowwise-scaled `torch._scaled_mm`, while a CUDA graph
replay of the same calls ran it at ~1230 TFLOP/s, above cuBLAS (bench/results/fp8_host_overhead.json). One
explanation: the block-scaled GEMM does more CUDA-core work per FLOP (each 128-wide K block's partial sum is
scaled and added in fp32), so under a sustained load it draws more power, and the GPU lowers its SM clock
more than for cuBLAS. This script measures that directly.

For each implementation in turn (alternated over `--rounds`), the same GEMM is launched back to back for
`--seconds`; a thread samples NVML every 10 ms (SM clock, power draw, the clock-throttle reason bits). Per
window it records TFLOP/s (CUDA events over the whole window), the median SM clock, the median power and
the throttle reasons seen, and TFLOP/s per GHz of SM clock: if the clock explains the gap, the per-GHz
ratio is closer to 1 (or above it) than the plain ratio.

    python bench/fp8_clocks.py --out bench/results/fp8_clocks.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_operands import rowwise, tensorwise  # noqa: E402  (the peer operands bench/fp8.py uses)
from timing import estimate_ms  # noqa: E402  (bench/timing.py)

# NVML's clocks-event (throttle) reason bits, nvml.h
THROTTLE_BITS = {
    0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal",
    0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks",
}  # fmt: skip


class Sampler(threading.Thread):
    """Samples (SM clock MHz, power W, throttle reasons) every `period_s` until stopped."""

    def __init__(self, index: int, period_s: float = 0.01):
        super().__init__(daemon=True)
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.period_s, self.samples, self.errors, self.running = period_s, [], [], True

    def run(self) -> None:
        n = self.nvml
        # newer nvidia-ml-py names it "clocks event reasons"; older ones only "throttle reasons"
        reasons_of = (
            getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        while self.running:
            try:
                clock = n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)
                power = n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
                reasons = reasons_of(self.handle)
            except n.NVMLError as e:  # keep sampling; the window reports how many samples it got
                self.errors.append(str(e))
                time.sleep(self.period_s)
                continue
            self.samples.append((time.perf_counter(), clock, power, reasons))
            time.sleep(self.period_s)

    def window(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"samples": 0}
        reasons = 0
        for s in inside:
            reasons |= s[3]
        return {
            "samples": len(inside),
            "sm_clock_mhz_median": statistics.median(s[1] for s in inside),
            "sm_clock_mhz_min": min(s[1] for s in inside),
            "power_w_median": round(statistics.median(s[2] for s in inside), 1),
            "throttle_reasons": sorted(name for bit, name in THROTTLE_BITS.items() if reasons & bit),
        }


def sustained(fn, seconds: float, flops: float, sampler: Sampler) -> dict:
    """Launch fn back to back for about `seconds`; TFLOP/s over the whole window and the sampled clocks."""
    for _ in range(3):
        fn()
    calls = max(10, int(seconds * 1e3 / estimate_ms(fn, 5)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    ms = start.elapsed_time(end)
    out = {"calls": calls, "tflops": round(flops * calls / ms / 1e9, 1)}
    # the first 20% of the window is the clock settling after the previous implementation
    out.update(sampler.window(t0 + 0.2 * (t1 - t0), t1))
    if out.get("sm_clock_mhz_median"):
        out["tflops_per_ghz"] = round(out["tflops"] / (out["sm_clock_mhz_median"] / 1e3), 1)
    return out


def gemm_impls(fp8, size: int, device: torch.device) -> dict:
    """The square GEMM of `size` four ways: moetron's block-scaled FP8, cuBLAS FP8 rowwise and tensorwise, bf16."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    aq, a_s = fp8.quantize_1x128(a)
    bq, b_s = fp8.quantize_128x128(b)
    a_r, a_rs = rowwise(a, dim=1)
    b_r, b_rs = rowwise(b, dim=1)
    b_rs = b_rs.t().contiguous()
    a_t, a_ts = tensorwise(a)
    b_t, b_ts = tensorwise(b)
    return {
        "moetron_fp8": lambda: fp8.fp8_gemm(aq, a_s, bq, b_s, out_dtype=torch.bfloat16),
        "scaled_mm_rowwise": lambda: torch._scaled_mm(
            a_r, b_r.t(), scale_a=a_rs, scale_b=b_rs, out_dtype=torch.bfloat16
        ),
        "scaled_mm_tensorwise": lambda: torch._scaled_mm(
            a_t, b_t.t(), scale_a=a_ts, scale_b=b_ts, out_dtype=torch.bfloat16
        ),
        "torch_bf16": lambda: torch.matmul(a, b.t()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default="unknown")
    parser.add_argument("--sizes", default="8192,4096", help="M = N = K of each square GEMM")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from moetron.kernels import fp8

    device = torch.device("cuda")
    sampler = Sampler(torch.cuda.current_device())
    sampler.start()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        impls = gemm_impls(fp8, size, device)
        flops = 2.0 * size**3
        row = {"M=N=K": size, "rounds": []}
        for _ in range(args.rounds):
            row["rounds"].append({name: sustained(fn, args.seconds, flops, sampler) for name, fn in impls.items()})
        for name in impls:
            for key in ("tflops", "sm_clock_mhz_median", "power_w_median", "tflops_per_ghz"):
                values = [r[name].get(key) for r in row["rounds"] if r[name].get(key) is not None]
                if values:
                    row[f"{name}_{key}"] = statistics.median(values)
        for key in ("tflops", "tflops_per_ghz"):
            if row.get(f"moetron_fp8_{key}") and row.get(f"scaled_mm_rowwise_{key}"):
                row[f"ratio_{key}_vs_rowwise"] = round(row[f"moetron_fp8_{key}"] / row[f"scaled_mm_rowwise_{key}"], 3)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
        rows.append(row)
    sampler.running = False
    import triton

    result = {
        "benchmark": "fp8_clocks",
        "command": " ".join(sys.argv),
        "git_sha": args.git_sha,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "power_limit": subprocess.run(
            ["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip(),  # fmt: skip
        "results": rows,
        "nvml_errors": sampler.errors[:10],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
