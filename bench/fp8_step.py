"""One model training step (forward + backward, no optimizer) in BF16 and in FP8, side by side in one run:
wall time per step, tokens/s, and the GPU's busy time in that step, to tell GPU-bound from host-bound;
each with moetron's kernel launch path (moetron/kernels/launch.py, `FastLaunch`) on and off.

The model is a preset (default deepseek_v3_mini) on one GPU under bf16 autocast, the BF16 and FP8
variants built from the same seed. Wall time: `--steps` timed steps after `--warmup` steps (which also
run the Triton autotuner), repeated `--rounds` times alternating FastLaunch on and off (the host's speed
drifts between minutes, so the two are compared interleaved); the median round is reported. GPU busy
time: the sum of the kernel durations that torch.profiler records for one more step. When wall time is
well above GPU busy time, the step is bound by the host (Python and kernel launches), not by the GPU.

`layer_host_us`: host time per call of one layer's forward + backward (FP8Linear, fp8_grouped_linear, and
nn.Linear for reference) at small sizes, where the GPU waits for the host: a loop of calls timed without
synchronizing, FastLaunch on and off alternated.

    python bench/fp8_step.py --out bench/results/fp8_step.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from timing import kernel_breakdown_us  # bench/timing.py (this script's directory is on sys.path)
from torch import nn

from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear
from moetron.kernels.fp8_linear import FP8Linear
from moetron.kernels.launch import FastLaunch
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


def measure(model, cfg, batch: int, seq: int, warmup: int, steps: int, rounds: int) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()

    walls = {True: [], False: []}
    for on in (True, False):
        FastLaunch.on = on
        for _ in range(warmup):
            step()
    for _ in range(rounds):
        for on in (True, False):
            FastLaunch.on = on
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            walls[on].append((time.perf_counter() - start) / steps)
    FastLaunch.on = True
    row = {"gpu_busy_ms": round(kernel_breakdown_us(step, calls=1)["busy"] / 1e3, 1)}
    for on, name in ((True, "fast_launch"), (False, "triton_launch")):
        wall_s = statistics.median(walls[on])
        row[name] = {
            "wall_ms": round(wall_s * 1e3, 1),
            "tokens_per_s": round(batch * seq / wall_s),
            "wall_ms_rounds": [round(w * 1e3, 1) for w in walls[on]],
        }
    return row


def layer_host_us(rounds: int, calls: int = 200) -> dict:
    """Host microseconds per forward + backward of one layer (module docstring), FastLaunch on and off."""
    shapes = {"linear_256x256x256": (256, 256, 256), "linear_4096x1536x1536": (4096, 1536, 1536)}
    layers = {}
    for name, (m, k, n) in shapes.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layers[f"nn.Linear {name}"] = (nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), x)
        layers[f"FP8Linear {name}"] = (FP8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), x)
    experts, rows, d, h = 8, 1024, 256, 256
    xg = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wg = torch.randn(experts, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ends = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * (rows // experts)
    layers[f"fp8_grouped_linear {experts}x{rows}x{d}x{h}"] = (lambda t: fp8_grouped_linear(t, wg, ends), xg)

    def loop(layer, x):
        for _ in range(calls):
            layer(x).sum().backward()

    times: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in layers}
    for layer, x in layers.values():
        for on in (True, False):  # warm-up: tuning and compiling, both paths
            FastLaunch.on = on
            loop(layer, x)
    for _ in range(rounds):
        for name, (layer, x) in layers.items():
            for on in (True, False):
                FastLaunch.on = on
                torch.cuda.synchronize()
                start = time.perf_counter()
                loop(layer, x)
                times[name][on].append((time.perf_counter() - start) / calls * 1e6)
                torch.cuda.synchronize()
    FastLaunch.on = True
    return {
        name: {
            "fast_launch": round(statistics.median(t[True]), 1),
            "triton_launch": round(statistics.median(t[False]), 1),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek_v3_mini")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here (bench/results/fp8_step.json)")
    parser.add_argument("--git-sha", default="unknown")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_step.py: needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
    layers = layer_host_us(args.rounds)
    for name, row in layers.items():
        print(f"{name}: {row} us of host time per forward + backward", flush=True)
    rows = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        model, cfg = build(args.preset, fp8)
        rows[name] = measure(model, cfg, args.batch, args.seq, args.warmup, args.steps, args.rounds)
        del model
        torch.cuda.empty_cache()  # the model of this variant is gone; give its memory back before the next
        print(f"{name}: {rows[name]}", flush=True)
    ratios = {
        path: round(rows["fp8"][path]["tokens_per_s"] / rows["bf16"][path]["tokens_per_s"], 3)
        for path in ("fast_launch", "triton_launch")
    }
    print(f"fp8 / bf16 tokens/s: {ratios}")
    if args.out:
        out = {
            "benchmark": "fp8_step", "command": " ".join(sys.argv), "git_sha": args.git_sha,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "tokens_per_step": args.batch * args.seq,
            "timing": f"wall: median of {args.rounds} rounds of {args.steps} steps after {args.warmup}, FastLaunch on "
            "and off alternated; gpu_busy: kernel time of one profiled step; layer_host_us: median of "
            f"{args.rounds} rounds of 200 calls",
            "results": rows, "fp8_vs_bf16_tokens_per_s": ratios, "layer_host_us": layers,
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
