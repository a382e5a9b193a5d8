"""Markdown tables for the README from bench/results/*.json (the README's result tables are pasted
from this output, so every number there traces back to a recorded run).

    python bench/tables.py attention    # bench/results/attention.json
    python bench/tables.py fp8          # bench/results/fp8.json
    python bench/tables.py fp8_fusions  # bench/results/fp8_fusions.json
    python bench/tables.py fp8_convergence  # every bench/results/fp8_convergence*.json, a row each
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _backward_only(fwd: float | None, fwd_bwd: float | None) -> float | None:
    """Backward TFLOP/s from a forward and a forward+backward rate of one implementation (FLOPs counted as F and
    3.5 F, the backward 2.5 F): 2.5 / (3.5 / fwd_bwd - 1 / fwd)."""
    if not fwd or not fwd_bwd:
        return None
    return 2.5 / (3.5 / fwd_bwd - 1.0 / fwd)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def attention(data: dict) -> str:
    """One row per benchmarked (shape, mask, pass), and after each forward+backward row a `bwd` row derived from
    it and the forward row of the same run (the backward alone, which the issue's 0.9x target is about)."""
    impls = ("moetron_triton", "triton_kernel", "sdpa_flash", "sdpa_cudnn")
    fwd = {(tuple(r["shape"]), r["causal"]): r for r in data["results"] if r["mode"] == "fwd"}
    rows = []
    for r in data["results"]:
        b, h, s, dq, dv = r["shape"]
        dims = f"{dq}" if dq == dv else f"{dq}/{dv}"
        label = [f"({b}, {h}, {s}, {dims})", "causal" if r["causal"] else "full"]
        rows.append([
            *label, "fwd" if r["mode"] == "fwd" else "fwd+bwd", *(_fmt(r.get(i)) for i in impls),
            _fmt(r.get("ratio_vs_sdpa_cudnn"), 2), _fmt(r.get("ratio_vs_sdpa_flash"), 2),
        ])  # fmt: skip
        f = fwd.get((tuple(r["shape"]), r["causal"]))
        if r["mode"] == "fwd_bwd" and f is not None:
            bwd = {i: _backward_only(f.get(i), r.get(i)) for i in impls}
            rows.append([
                *label, "bwd (derived)", *(_fmt(bwd[i]) for i in impls),
                _fmt(_ratio(bwd["moetron_triton"], bwd["sdpa_cudnn"]), 2),
                _fmt(_ratio(bwd["moetron_triton"], bwd["sdpa_flash"]), 2),
            ])  # fmt: skip
    header = ["shape", "mask", "pass", "moetron", "(Triton kernels)", "SDPA flash", "SDPA cuDNN", "vs cuDNN",
              "vs flash"]  # fmt: skip
    return _table(header, rows)


def fp8(data: dict) -> str:
    out = []
    sections = {
        "gemm": (
            ["shape M x N x K", "what", "moetron fp8_gemm", "(Triton kernel)", "+ quantize", "bf16 matmul",
             "cuBLAS fp8 tensorwise", "cuBLAS fp8 rowwise", "cuBLAS fp8 block-scaled", "vs rowwise",
             "vs block-scaled", "vs bf16"],
            lambda r: [r["moetron_fp8"], r.get("moetron_fp8_triton"), r["moetron_fp8_quant"], r["torch_bf16"],
                       r["scaled_mm_tensorwise"], r["scaled_mm_rowwise"], r.get("scaled_mm_blockwise"),
                       _fmt(r["ratio_moetron_fp8_vs_scaled_mm_rowwise"], 2),
                       _fmt(r.get("ratio_moetron_fp8_vs_scaled_mm_blockwise"), 2),
                       _fmt(r["ratio_moetron_fp8_vs_torch_bf16"], 2)],
        ),
        "grouped": (
            ["shape M x N x K", "what", "moetron fp8_grouped_gemm", "(Triton kernel)", "+ quantize",
             "bf16 _grouped_mm", "cuBLAS fp8 _scaled_grouped_mm rowwise", "cuBLAS fp8 grouped block-scaled",
             "vs cuBLAS fp8", "vs bf16"],
            lambda r: [r["moetron_fp8"], r.get("moetron_fp8_triton"), r["moetron_fp8_quant"], r["grouped_mm_bf16"],
                       r.get("scaled_grouped_mm_rowwise"), r.get("scaled_grouped_mm_blockwise"),
                       _fmt(r.get("ratio_moetron_fp8_vs_scaled_grouped_mm_rowwise"), 2),
                       _fmt(r["ratio_moetron_fp8_vs_grouped_mm_bf16"], 2)],
        ),
        "linear": (
            ["shape M x N x K", "what", "moetron FP8Linear", "bf16 nn.Linear", "vs bf16"],
            lambda r: [r["moetron_fp8"], r["torch_bf16"], _fmt(r["ratio_moetron_fp8_vs_torch_bf16"], 2)],
        ),
    }  # fmt: skip
    for name, (header, cells) in sections.items():
        rows = []
        for r in data["results"]:
            if r["section"] != name:
                continue
            shape = r["shape"]
            label = f"{shape['M']} x {shape['N']} x {shape['K']}"
            if "experts" in shape:
                label = f"E={shape['experts']}: {label}"
            rows.append([label, r["what"], *(_fmt(c) if isinstance(c, float) or c is None else c for c in cells(r))])
        out.append(_table(header, rows))
    return "\n\n".join(out)


_FUSION_VARIANTS = {
    "fp8": "FP8, all three fusions (the default)",
    "fp8 norm apart": "FP8, norm unfused",
    "fp8 swiglu apart": "FP8, SwiGLU unfused",
    "fp8 one by one": "FP8, none of the three (siblings one by one too)",
    "bf16": "BF16",
}


def fp8_fusions(data: dict) -> str:
    """The model section (ms and tokens/s per variant) and the layer section (the fused pairs against unfused FP8
    and BF16)."""
    model = data["model"]
    rows = [
        [label, _fmt(model["median_ms"][key], 1), f"{model['tokens_per_s'][key] / 1000:.1f}k"]
        for key, label in _FUSION_VARIANTS.items()
        if key in model["median_ms"]
    ]
    out = [_table(["variant", "ms per fwd+bwd", "tokens/s"], rows)]
    rows = []
    for r in data.get("layer", []):
        ms = r["ms"]
        cells = [f"{ms[k]:.2f} ms" for k in ("fp8 fused", "fp8 unfused", "bf16")]
        rows.append([f"{r['what']} ({r['shape']})", *cells, f"{ms['bf16'] / ms['fp8 fused']:.2f}x"])
    if rows:
        out.append(_table(["pair (tokens x in -> out)", "FP8 fused", "FP8 unfused", "BF16", "fused vs BF16"], rows))
    return "\n\n".join(out)


def _override(overrides: list[str], key: str, default="-"):
    for item in reversed(overrides):
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return default


# overrides that do not change what a convergence run computes (the seed is what a setting's rows vary)
_NOT_THE_SETTING = ("trainer.seed=", "trainer.save_final=", "trainer.checkpoint_every=", "trainer.resume=", "logging")


def fp8_convergence(paths: list[Path]) -> str:
    """A row per convergence comparison (FP8 against BF16, or the BF16 noise floor: BF16 against BF16 with other
    kernels): its setting, the final losses (mean of the last 10 steps both runs completed) and the relative
    differences of the final training loss and of the last held-out loss. Then, for each setting (all overrides
    but the seed equal) compared at two seeds or more, the mean and the range of those differences over its seeds."""
    rows, by_setting = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        c = data.get("comparison")
        if not c or not c.get("steps_compared"):
            continue
        common = data["common_overrides"]
        second = data.get("second_run", {}).get("name", "fp8")
        what = "FP8" if second == "fp8" else "floor: BF16 + " + " ".join(data["second_run"]["overrides"])
        what = " ".join([what, *(o for o in common if o.startswith("model.fp8."))])
        corpus = "stdlib source" if _override(common, "data.source", "builtin") == "bin" else "built-in docs"
        warmup, seed = _override(common, "optim.warmup_steps"), _override(common, "trainer.seed")
        rows.append([
            path.name, what, corpus, warmup, seed, c["steps_compared"], f"{c['final_loss_bf16']:.4f}",
            f"{c[f'final_loss_{second}']:.4f}", f"{100 * c['rel_diff']:+.2f}%",
            "-" if c.get("eval_rel_diff") is None else f"{100 * c['eval_rel_diff']:+.2f}%",
            data["device"].replace("NVIDIA ", ""), data["git_sha"][:7],
        ])  # fmt: skip
        setting = tuple(o for o in common if not o.startswith(_NOT_THE_SETTING))  # (same data, same recipe)
        seeds = by_setting.setdefault((what, corpus, warmup, setting), {})
        seeds.setdefault(seed, (c["rel_diff"], c.get("eval_rel_diff")))  # (a seed's first file in name order)
    header = ["file", "compared", "data", "warm-up", "seed", "steps", "BF16 final", "other final", "final diff",
              "held-out diff", "device", "sha"]  # fmt: skip
    out = [_table(header, rows)]
    summary = []
    for (what, corpus, warmup, _), seeds in by_setting.items():
        if len(seeds) < 2:
            continue
        final = [100 * d for d, _ in seeds.values()]
        held = [100 * e for _, e in seeds.values() if e is not None]
        cells = [f"{sum(final) / len(final):+.2f}% ({min(final):+.2f} to {max(final):+.2f})"]
        cells.append(f"{sum(held) / len(held):+.2f}% over {len(held)}" if held else "-")
        summary.append([what, corpus, warmup, ", ".join(sorted(seeds)), *cells])
    if summary:
        out.append(_table(["compared", "data", "warm-up", "seeds", "final diff: mean (range)", "held-out diff"],
                          summary))  # fmt: skip
    return "\n\n".join(out)


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "attention"
    if name == "fp8_convergence":
        print("<!-- fp8_convergence: bench/results/fp8_convergence*.json -->")
        print(fp8_convergence(sorted(RESULTS.glob("fp8_convergence*.json"))))
        return
    data = json.loads((RESULTS / f"{name}.json").read_text())
    print(f"<!-- {name}: bench/results/{name}.json, {data['device']}, sha {data['git_sha'][:7]}, "
          f"torch {data['torch']}, triton {data.get('triton', '-')} -->")  # fmt: skip
    print({"attention": attention, "fp8": fp8, "fp8_fusions": fp8_fusions}[name](data))


if __name__ == "__main__":
    main()
