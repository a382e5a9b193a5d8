"""FP8 sibling projections as one GEMM (`moetron.model.layers.project_together`: SwiGLU's gate + up, MLA's q_a +
kv_a, GQA's q, k, v) against one FP8Linear call per layer, and BF16 for reference: forward + backward time of a
preset cut to a few blocks, fp32 master weights under bf16 autocast (the trainer's setting), no activation
checkpointing and no optimizer step. The three variants alternate in one process (`--rounds` rounds of `--iters`
steps; medians of the rounds after the first). "one by one" patches `moetron.model.layers.shares_input` to say
no, so the model runs exactly as before project_together existed. "bf16 together" (this benchmark only, not in
the model) patches `project_together` to run BF16 siblings as one `F.linear` over their concatenated weights: what
BF16 would gain from the same fusion, for a fair FP8-against-BF16 comparison.

    python bench/fp8_siblings.py --out bench/results/fp8_siblings.json --git-sha SHA \\
        --preset deepseek_v3_mini --layers 4 --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import moetron.model.attention as attention
import moetron.model.layers as layers
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default=None)
    parser.add_argument("--preset", default="deepseek_v3_mini")
    parser.add_argument("--layers", type=int, default=4, help="n_layers of the cut model (MTP blocks as the preset)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], help="more model fields, key=int (e.g. for CPU sizes)")
    args = parser.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.preset}.yaml"))
    cfg.update(n_layers=args.layers, max_seq_len=max(args.seq, cfg.get("max_seq_len", args.seq)))
    cfg.update({key: int(value) for key, value in (item.split("=") for item in args.set)})
    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1), device=dev)
    models = {fp8: Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=fp8))).to(dev) for fp8 in (False, True)}
    variants = {
        "bf16": (False, True), "bf16 together": (False, True), "fp8 together": (True, True),
        "fp8 one by one": (True, False),
    }  # fmt: skip
    shares_input, project_together = layers.shares_input, layers.project_together
    rounds, losses, stacked = {name: [] for name in variants}, {}, [0]

    def bf16_together(x, group, cache=None):
        if all(type(layer) is torch.nn.Linear and layer.bias is None for layer in group):
            stacked[0] += 1
            y = F.linear(x, torch.cat([layer.weight for layer in group]))
            return y.split([layer.out_features for layer in group], dim=-1)
        return project_together(x, group, cache)

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        return out.loss.detach()

    for r in range(args.rounds):
        for name, (fp8, together) in variants.items():
            layers.shares_input = shares_input if together else (lambda *_: False)
            patched = bf16_together if name == "bf16 together" else project_together
            layers.project_together = attention.project_together = patched  # (attention imports it by name)
            step(models[fp8])  # (warm-up; on the first round also compiling and tuning)
            if dev == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                loss = step(models[fp8])
            if dev == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.iters * 1e3
            losses[name] = float(loss)
            if r or args.rounds == 1:
                rounds[name].append(round(ms, 2))
            print(f"round {r} {name}: {ms:.1f} ms", flush=True)
    layers.shares_input, layers.project_together = shares_input, project_together
    attention.project_together = project_together
    median = {name: statistics.median(v) for name, v in rounds.items()}
    sha = args.git_sha or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()  # fmt: skip
    out = {
        "benchmark": "fp8_siblings", "git_sha": sha, "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
        "args": vars(args), "tokens": args.batch * args.seq, "unit": "ms per forward+backward (wall, synchronized)",
        "rounds_ms": rounds, "median_ms": median,
        "tokens_per_s": {name: round(args.batch * args.seq / ms * 1e3) for name, ms in median.items()},
        "together_over_one_by_one": median["fp8 one by one"] / median["fp8 together"],
        "bf16_together_over_bf16": median["bf16"] / median["bf16 together"], "last_loss": losses,
        "bf16_stacked_calls": stacked[0],
    }  # fmt: skip
    keys = ("median_ms", "tokens_per_s", "together_over_one_by_one", "bf16_together_over_bf16")
    print(json.dumps({k: out[k] for k in keys}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
