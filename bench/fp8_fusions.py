"""The FP8 fusions in the model, each against the model without it, and BF16 for reference.

* Sibling projections as one GEMM (`moetron.model.layers.project_together`: SwiGLU's gate + up, MLA's q_a + kv_a,
  GQA's q, k, v) against one FP8Linear call per layer.
* The SwiGLU fused into the down projection's quantization (`model.fp8.fuse_swiglu`, moetron/kernels/fp8_swiglu.py)
  against silu, the product and the down projection's own quantizer.
* RMSNorm fused into the quantization of the projections it feeds (`model.fp8.fuse_norm`, moetron/kernels/fp8_norm.py:
  the attention's and a dense FFN's pre-norms, MLA's latent norms) against the norm, then the projections' quantizer.

Section "model": forward + backward time of a preset cut to a few blocks, fp32 master weights under bf16 autocast
(the trainer's setting), no activation checkpointing and no optimizer step. The variants alternate in one process
(`--rounds` rounds of `--iters` steps; medians of the rounds after the first):

    fp8               all three (the default model)
    fp8 norm apart    without the norm fusion (fuse_norm off in every module)
    fp8 swiglu apart  without the SwiGLU fusion (fuse_swiglu off in every module)
    fp8 one by one    none of the three (`shares_input` patched to say no, the experts' gate and up apart as well):
                      the model before them
    bf16              the BF16 model
    bf16 together     BF16 with its siblings as one `F.linear` over concatenated weights (a patch of this benchmark
                      only, not in the model): what BF16 would gain from the same fusion, for a fair comparison

Section "layer" (GPU only), forward + backward at the preset's and at DeepSeek-V3's sizes (CUDA events, medians):
* the down projection of a gated FFN: `fp8_swiglu_linear(gate, up, W)` against `fp8_linear(silu(gate) * up, W)` and
  against `F.linear(silu(gate) * up, W)` in bf16; gate and up are views of one (M, 2F) bf16 tensor, as the model
  hands them over;
* a pre-norm and the projections it feeds (MLA's q_a + kv_a as one GEMM): `fp8_norm_linear` against RMSNorm + the
  FP8 siblings and against RMSNorm + `F.linear` over the same stacked weights in bf16; x is fp32, as the residual
  stream is with fp32 master weights under autocast.

    python bench/fp8_fusions.py --out bench/results/fp8_fusions.json --git-sha SHA \\
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
VARIANTS = {  # name: (fp8, siblings together, swiglu fused, norm fused)
    "fp8": (True, True, True, True),
    "fp8 norm apart": (True, True, True, False),
    "fp8 swiglu apart": (True, True, False, True),
    "fp8 one by one": (True, False, False, False),
    "bf16": (False, True, False, False),
    "bf16 together": (False, True, False, False),
}
NORM_SHAPES = [  # (tokens M, d_model D, the projections' widths, what)
    (8192, 1536, (768, 320), "deepseek_v3_mini attention pre-norm -> q_a + kv_a, 4 x 2048 tokens"),
    (16384, 7168, (1536, 576), "DeepSeek-V3 attention pre-norm -> q_a + kv_a"),
]
LAYER_SHAPES = [  # (tokens M, hidden F, out N, what)
    (8192, 4096, 1536, "deepseek_v3_mini dense FFN down (4096 -> 1536), 4 x 2048 tokens"),
    (16384, 2048, 7168, "DeepSeek-V3 expert down (2048 -> 7168)"),
    (16384, 18432, 7168, "DeepSeek-V3 dense FFN down (18432 -> 7168)"),
]


def model_section(args, dev: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.preset}.yaml"))
    cfg.update(n_layers=args.layers, max_seq_len=max(args.seq, cfg.get("max_seq_len", args.seq)))
    cfg.update({key: int(value) for key, value in (item.split("=") for item in args.set)})
    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1), device=dev)
    models = {fp8: Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=fp8))).to(dev) for fp8 in (False, True)}
    models[False].load_state_dict(models[True].state_dict())
    swiglus = [m for m in models[True].modules() if hasattr(m, "fuse_swiglu")]
    norm_users = [m for m in models[True].modules() if hasattr(m, "fuse_norm")]
    expert_groups = [m for m in models[True].modules() if hasattr(m, "gate_up_together")]
    shares_input, project_together = layers.shares_input, layers.project_together
    rounds, losses, stacked = {name: [] for name in VARIANTS}, {}, [0]

    def bf16_together(x, group, cache=None, norm=None, fuse_norm=False):
        if len(group) > 1 and all(type(layer) is torch.nn.Linear and layer.bias is None for layer in group):
            stacked[0] += 1
            y = F.linear(x if norm is None else norm(x), torch.cat([layer.weight for layer in group]))
            return y.split([layer.out_features for layer in group], dim=-1)
        return project_together(x, group, cache, norm, fuse_norm)

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        return out.loss.detach()

    try:
        for r in range(args.rounds):
            for name, (fp8, together, fused, norm_fused) in VARIANTS.items():
                layers.shares_input = shares_input if together else (lambda *_: False)
                patched = bf16_together if name == "bf16 together" else project_together
                layers.project_together = attention.project_together = patched  # (attention imports it by name)
                for module in swiglus:
                    module.fuse_swiglu = fused
                for module in norm_users:
                    module.fuse_norm = norm_fused
                for module in expert_groups:
                    module.gate_up_together = together
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
    finally:
        layers.shares_input, layers.project_together = shares_input, project_together
        attention.project_together = project_together
        for module in swiglus:
            module.fuse_swiglu = True
        for module in norm_users:
            module.fuse_norm = True
        for module in expert_groups:
            module.gate_up_together = True
    median = {name: statistics.median(v) for name, v in rounds.items()}
    return {
        "tokens": args.batch * args.seq, "unit": "ms per forward+backward (wall, synchronized)",
        "rounds_ms": rounds, "median_ms": median,
        "tokens_per_s": {name: round(args.batch * args.seq / ms * 1e3) for name, ms in median.items()},
        "all_three_speedup": median["fp8 one by one"] / median["fp8"],
        "swiglu_fusion_speedup": median["fp8 swiglu apart"] / median["fp8"],
        "norm_fusion_speedup": median["fp8 norm apart"] / median["fp8"],
        "fp8_over_bf16": median["bf16"] / median["fp8"],
        "bf16_together_over_bf16": median["bf16"] / median["bf16 together"], "last_loss": losses,
        "bf16_stacked_calls": stacked[0], "fused_swiglu_modules": len(swiglus), "fused_norm_modules": len(norm_users),
    }  # fmt: skip


def layer_section(args) -> list[dict]:
    rows = []
    for m, f, n, what in LAYER_SHAPES:
        row = time_down_projection(m, f, n, args)
        row["what"] = what
        print(json.dumps({k: row[k] for k in ("shape", "ms", "fused_over_unfused", "fused_over_bf16")}), flush=True)
        rows.append(row)
    for m, d, outs, what in NORM_SHAPES:
        row = time_normed_projections(m, d, outs, args)
        row["what"] = what
        print(json.dumps({k: row[k] for k in ("shape", "ms", "fused_over_unfused", "fused_over_bf16")}), flush=True)
        rows.append(row)
    return rows


def _timed(impls: dict, leaves: list, dy: torch.Tensor, args) -> dict:
    """{"ms": name -> median fwd+bwd ms, "kernels_us": name -> GPU breakdown} of each forward in `impls`."""
    from timing import kernel_breakdown_us, median_ms  # bench/timing.py (this script's directory is on sys.path)

    row = {"ms": {}, "kernels_us": {}}
    for name, forward in impls.items():

        def fwd_bwd(forward=forward):
            for leaf in leaves:
                leaf.grad = None
            forward().backward(dy)

        row["ms"][name] = round(median_ms(fwd_bwd, torch.device("cuda"), args.warmup_ms, args.rep_ms), 4)
        row["kernels_us"][name] = kernel_breakdown_us(fwd_bwd)
    row["fused_over_unfused"] = row["ms"]["fp8 unfused"] / row["ms"]["fp8 fused"]
    row["fused_over_bf16"] = row["ms"]["bf16"] / row["ms"]["fp8 fused"]
    return row


def time_normed_projections(m: int, d: int, outs: tuple, args) -> dict:
    """fwd+bwd of rmsnorm(x) @ [W_i]^T (fp32 x, fp32 norm weight, bf16 projection weights), three ways."""
    from moetron.kernels.fp8_linear import FP8LinearFunction
    from moetron.kernels.fp8_norm import fp8_norm_linear
    from moetron.model.layers import RMSNorm

    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(m, d, device=device, requires_grad=True)
    norm = RMSNorm(d).to(device)
    weights = [(torch.randn(n, d, device=device) * d**-0.5).to(torch.bfloat16).requires_grad_() for n in outs]
    dy = torch.randn(m, sum(outs), device=device, dtype=torch.bfloat16)

    def autocast(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()

    impls = {
        "fp8 fused": lambda: autocast(lambda: fp8_norm_linear(x, norm.weight, norm.eps, tuple(weights))),
        "fp8 unfused": lambda: autocast(
            lambda: FP8LinearFunction.apply(norm(x), weights[0], None, False, None, None, *weights[1:])
        ),
        "bf16": lambda: autocast(lambda: F.linear(norm(x), torch.cat(weights))),
    }
    row = _timed(impls, [x, norm.weight, *weights], dy, args)
    row["shape"] = f"{m} x {d} -> {' + '.join(map(str, outs))}"
    return row


def time_down_projection(m: int, f: int, n: int, args) -> dict:
    """fwd+bwd ms and kernel breakdown of a gated FFN's down projection (M tokens, F -> N), three ways."""
    from moetron.kernels.fp8_linear import fp8_linear
    from moetron.kernels.fp8_swiglu import fp8_swiglu_linear

    device = torch.device("cuda")
    torch.manual_seed(0)
    gate_up = torch.randn(m, 2 * f, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(n, f, device=device) * f**-0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    impls = {
        "fp8 fused": lambda: fp8_swiglu_linear(gate, up, weight),
        "fp8 unfused": lambda: fp8_linear(F.silu(gate) * up, weight),
        "bf16": lambda: F.linear(F.silu(gate) * up, weight),
    }
    row = _timed(impls, [gate_up, weight], dy, args)
    row["shape"] = f"{m} x {f} -> {n}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default=None)
    parser.add_argument("--sections", default="model,layer", help="comma-separated subset (layer: GPU only)")
    parser.add_argument("--preset", default="deepseek_v3_mini")
    parser.add_argument("--layers", type=int, default=4, help="n_layers of the cut model (MTP blocks as the preset)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=300.0)
    parser.add_argument("--set", nargs="*", default=[], help="more model fields, key=int (e.g. for CPU sizes)")
    args = parser.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sections = args.sections.split(",")
    sha = args.git_sha or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()  # fmt: skip
    out = {
        "benchmark": "fp8_fusions", "git_sha": sha, "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
        "args": vars(args),
    }  # fmt: skip
    if "model" in sections:
        out["model"] = model_section(args, dev)
        keys = ("median_ms", "tokens_per_s", "all_three_speedup", "swiglu_fusion_speedup", "norm_fusion_speedup",
                "fp8_over_bf16")  # fmt: skip
        print(json.dumps({k: out["model"][k] for k in keys}, indent=1), flush=True)
    if "layer" in sections and dev == "cuda":
        out["layer"] = layer_section(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
