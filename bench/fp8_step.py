"""One model training step (forward + backward, no optimizer) in BF16 and in FP8, side by side in one run:
wall time per step, tokens/s, and the GPU's busy time in that step, to tell GPU-bound from host-bound.

The model is a preset (default deepseek_v3_mini) on one GPU under bf16 autocast, the BF16 and FP8
variants built from the same seed. Wall time: the mean over `--steps` timed steps after `--warmup`
steps (which also run the Triton autotuner). GPU busy time: the sum of the kernel durations that
torch.profiler records for one more step. When wall time is well above GPU busy time, the step is
bound by the host (Python and kernel launches), not by the GPU.

    python bench/fp8_step.py --out bench/results/fp8_step.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config


def build(preset: str, fp8: bool) -> tuple[Transformer, ModelConfig]:
    cfg = ModelConfig.from_preset(preset, fp8=FP8Config(enabled=fp8))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cuda")
    model.init_weights()
    return model, cfg


def measure(preset: str, fp8: bool, batch: int, seq: int, warmup: int, steps: int) -> dict:
    model, cfg = build(preset, fp8)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_s = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return {
        "wall_ms": round(wall_s * 1e3, 1),
        "tokens_per_s": round(batch * seq / wall_s),
        "gpu_busy_ms": round(gpu_us / 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek_v3_mini")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here (bench/results/fp8_step.json)")
    parser.add_argument("--git-sha", default="unknown")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_step.py: needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
    rows = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        rows[name] = measure(args.preset, fp8, args.batch, args.seq, args.warmup, args.steps)
        torch.cuda.empty_cache()  # the model of this variant is gone; give its memory back before the next
        print(f"{name}: {rows[name]}", flush=True)
    ratio = round(rows["fp8"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"], 3)
    print(f"fp8 / bf16 tokens/s: {ratio}")
    if args.out:
        out = {
            "benchmark": "fp8_step", "command": " ".join(sys.argv), "git_sha": args.git_sha,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "tokens_per_step": args.batch * args.seq,
            "timing": f"wall: mean of {args.steps} steps after {args.warmup}; gpu_busy: kernel time of one profiled step",
            "results": rows, "fp8_vs_bf16_tokens_per_s": ratio,
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
