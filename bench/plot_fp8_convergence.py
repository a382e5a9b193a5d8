"""Plot of bench/fp8_convergence.py's JSON: the BF16 and FP8 loss curves (raw and smoothed) with the held-out
LM loss where it was evaluated, their relative difference per step, and the gradient norms (an early divergence
shows there first), with the final losses and the < 1% target annotated.

Needs matplotlib (`pip install -e ".[bench]"`); runs on the CPU machine after the GPU run.

    python bench/plot_fp8_convergence.py bench/results/fp8_convergence.json   # -> bench/results/fp8_convergence.png

`--floor FLOOR.json` adds the noise-floor comparison of the same setting (BF16 against BF16 with other kernels,
`--second bf16`): its second BF16 run as a third curve, and its difference from BF16 beside FP8's.

    python bench/plot_fp8_convergence.py bench/results/fp8_convergence_code.json \
        --floor bench/results/fp8_convergence_code_floor.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLORS = {"bf16": "tab:blue", "fp8": "tab:orange", "bf16_b": "tab:green"}


def ema(values: list[float | None], decay: float) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled toward 0);
    missing values (skipped steps) hold the average and plot as gaps."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(math.nan)
            continue
        avg = decay * avg + (1 - decay) * v
        weight = decay * weight + (1 - decay)
        out.append(avg / weight)
    return out


def nan_for_none(values):
    return [math.nan if v is None else v for v in values]


def relative_to(base: dict, other: dict, key: str) -> tuple[list, list]:
    """(steps, 100 * (other - base) / |base|) of two curves' `key` over the steps both have (None where either
    value is missing)."""
    n = min(len(base["step"]), len(other["step"]))
    rel = [
        None if x is None or y is None or x == 0 else 100 * (y - x) / abs(x)
        for x, y in zip(base[key][:n], other[key][:n])
    ]
    return base["step"][:n], rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default="bench/results/fp8_convergence.json")
    parser.add_argument("--out", default=None, help="PNG path (default: the results path with .png)")
    parser.add_argument("--key", default="loss", choices=["loss", "lm_loss"], help="which loss to plot")
    parser.add_argument("--ema", type=float, default=0.9, help="smoothing decay of the thick curves")
    parser.add_argument("--floor", default=None, help="the same setting's noise-floor JSON (--second bf16)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.results).read_text())
    runs = {name: run for name, run in data["runs"].items() if run.get("curve", {}).get("step")}
    if not runs:
        raise SystemExit(f"{args.results}: no run has any steps")
    floor = json.loads(Path(args.floor).read_text()) if args.floor else None
    if floor is not None:
        if floor["common_overrides"] != data["common_overrides"] or "bf16_b" not in floor["runs"]:
            raise SystemExit(f"{args.floor}: not a noise floor (--second bf16) of {args.results}'s setting")
        runs["bf16_b"] = floor["runs"]["bf16_b"]
    out_path = Path(args.out) if args.out else Path(args.results).with_suffix(".png")

    fig, (ax_loss, ax_diff, ax_grad) = plt.subplots(
        3, 1, figsize=(10, 9.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 1.1]}, constrained_layout=True
    )
    for name, run in runs.items():
        steps, values = run["curve"]["step"], run["curve"][args.key]
        color = COLORS.get(name)
        ax_loss.plot(steps, nan_for_none(values), color=color, alpha=0.25, linewidth=0.8)
        tps = run.get("tokens_per_sec_median")
        title = "BF16 + " + " ".join(floor["second_run"]["overrides"]) if name == "bf16_b" else name.upper()
        label = f"{title} (EMA {args.ema})" + (f", {tps:,.0f} tokens/s" if tps else "")
        ax_loss.plot(steps, ema(values, args.ema), color=color, linewidth=2, label=label)
        held_out = run.get("eval", {})
        if held_out.get("step"):
            ax_loss.plot(held_out["step"], nan_for_none(held_out["loss"]), color=color, marker="o", markersize=4,
                         linestyle=":", linewidth=1.2, label=f"{name.upper()} held-out LM loss")  # fmt: skip
        ax_grad.plot(steps, nan_for_none(run["curve"]["grad_norm"]), color=color, linewidth=0.9, label=name.upper())
    ax_loss.set_ylabel(args.key)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")

    comparison = data.get("comparison", {})
    suffix = "" if args.key == "loss" else f"_{args.key}"
    lines = []
    if f"rel_diff{suffix}" in comparison:
        window, n = comparison.get("final_window", 10), comparison["steps_compared"]
        rel = comparison[f"rel_diff{suffix}"]
        target = comparison.get("target_rel_diff", 0.01)
        verdict = "PASS" if abs(rel) < target and comparison.get("passed", True) else "FAIL"
        lines += [
            f"final {args.key} (mean of last {window} of {n} steps)",
            f"BF16 {comparison[f'final_loss_bf16{suffix}']:.4f}   FP8 {comparison[f'final_loss_fp8{suffix}']:.4f}",
            f"relative difference {rel:+.3%}  (target < {target:.0%}: {verdict})",
        ]
    if "eval_rel_diff" in comparison:
        lines.append(f"held-out LM loss after step {comparison['eval_step']}: {comparison['eval_rel_diff']:+.3%}")
    if floor is not None and "rel_diff" in floor.get("comparison", {}):
        lines.append(f"noise floor (BF16 vs BF16 + other kernels): final {floor['comparison']['rel_diff']:+.3%}")
        if "eval_rel_diff" in floor["comparison"]:
            lines.append(f"                           held-out {floor['comparison']['eval_rel_diff']:+.3%}")
    if "step1_rel_diff" in comparison:
        lines.append(f"step 1 (same weights and batch): {comparison['step1_rel_diff']:+.3%}")
    if "fp8_over_bf16_tokens_per_sec" in comparison:
        lines.append(f"throughput FP8 / BF16: {comparison['fp8_over_bf16_tokens_per_sec']:.2f}x")
    if lines:
        ax_loss.text(
            0.98, 0.55, "\n".join(lines), transform=ax_loss.transAxes, ha="right", va="center", fontsize=9,
            family="monospace", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
        )  # fmt: skip

    if {"bf16", "fp8"} <= runs.keys():
        base = runs["bf16"]["curve"]
        steps, rel = relative_to(base, runs["fp8"]["curve"], args.key)
        ax_diff.plot(steps, nan_for_none(rel), color="0.6", linewidth=0.8, alpha=0.6, label="per step")
        ax_diff.plot(steps, ema(rel, args.ema), color="tab:red", linewidth=1.8, label=f"FP8, EMA {args.ema}")
        if "bf16_b" in runs:  # the noise floor: BF16 with other kernels against BF16
            steps, rel = relative_to(base, runs["bf16_b"]["curve"], args.key)
            ax_diff.plot(steps, ema(rel, args.ema), color="tab:green", linewidth=1.4,
                         label=f"BF16 + other kernels (noise floor), EMA {args.ema}")  # fmt: skip
        target = 100 * comparison.get("target_rel_diff", 0.01)
        for y in (-target, target):
            ax_diff.axhline(y, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.6)
        ax_diff.axhline(0, color="black", linewidth=0.6)
        ax_diff.legend(loc="upper right", fontsize=8)
    ax_diff.set_ylabel("(run - BF16) / BF16  [%]")
    ax_diff.grid(alpha=0.3)
    ax_grad.set_yscale("log")
    ax_grad.set_ylabel("gradient norm\n(before clipping)")
    ax_grad.set_xlabel("step")
    ax_grad.grid(alpha=0.3)
    ax_grad.legend(loc="upper right", fontsize=8)

    sha = (data.get("git_sha") or "unknown")[:10]
    ax_loss.set_title(
        f"FP8 vs BF16 training, {data.get('model')}: {data.get('tokens_per_step', '?')} tokens/step, "
        f"{data.get('device')}, {data.get('date')}, {sha}" + ("" if data.get("complete") else "  [INCOMPLETE]"),
        fontsize=10,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
