"""FP8 throughput on one GPU: moetron's block-scaled FP8 kernels vs cuBLAS FP8 (`torch._scaled_mm`),
`torch._grouped_mm` and torch bf16, side by side in one run, in TFLOP/s.

Three sections, each row one shape, each implementation one column (None + `<impl>_error` when it
fails, so one peer that does not take a shape does not stop the run):

* gemm: C = A @ B^T, A (M, K), B (N, K). `moetron_fp8` is `fp8_gemm` on pre-quantized operands
  (1x128 activation tiles, 128x128 weight blocks: DeepSeek-V3's recipe), `moetron_fp8_quant` adds
  quantizing both operands; peers `torch_bf16` (torch.matmul), `scaled_mm_tensorwise` (one fp32
  scale per operand), `scaled_mm_rowwise` (scale_a (M, 1), scale_b (1, N)) and `scaled_mm_blockwise`:
  cuBLAS's own block-scaled GEMM (`torch.nn.functional.scaled_mm`, BlockWise1x128 x BlockWise128x128,
  torch >= 2.9), the same recipe on moetron's quantized operands. `rel_diff_vs_cublas_blockwise` is
  ||C_moetron - C_cublas|| / ||C_cublas||: two implementations of one sum, so it is rounding-small.
* grouped: the MoE expert GEMMs, rows sorted by expert: `moetron_fp8` is `fp8_grouped_gemm`
  (pre-quantized), `moetron_fp8_quant` adds the quantization, peers `grouped_mm_bf16`
  (`torch._grouped_mm`) and `scaled_grouped_mm_rowwise` (`torch._scaled_grouped_mm`, cuBLAS-style
  rowwise FP8) and `scaled_grouped_mm_blockwise` (`torch.nn.functional.scaled_grouped_mm` with
  DeepSeek's recipe, where this torch's cuBLAS takes it). Group sizes: multinomial from a fixed seed
  over skewed expert probabilities; `aligned` rounds every group up to a multiple of 128 rows (the
  padding of the FP8 MoE path).
* linear: a full forward + backward (`y.backward(grad)`, grads of input and weight) of
  `FP8Linear` vs `nn.Linear`, both with bf16 parameters and inputs, no autocast (and the same with fp32
  weights under bf16 autocast). `kernels_us_<impl>`: the GPU time of one call by kernel (torch.profiler,
  after the timing), so the JSON shows what the GEMMs and what the quantizers cost.

FLOPs: 2*M*N*K per GEMM (the total routed rows for grouped), 3 * 2*M*N*K for a linear's forward +
backward. Timing: CUDA events around each call, after a warm-up, median over the reps; no cache
flush. `rel_err_*` is ||C - C_bf16|| / ||C_bf16|| of one output, a check that a fast number is not
a wrong one (FP8 e4m3 with fine-grained scales gives ~3-5%).

    python bench/fp8.py --out bench/results/fp8.json --git-sha SHA
    python bench/fp8.py --quick                       # small shapes, a smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
from fp8_operands import blockwise_scales, group_sizes, quantize_weight_grouped, rowwise, tensorwise
from timing import kernel_breakdown_us, median_ms  # bench/timing.py (this script's directory is on sys.path)
from torch import nn
from torch.nn import functional as F

GEMM_SHAPES = [  # (M, N, K, label)
    (4096, 4096, 4096, "square"),
    (8192, 8192, 8192, "square"),
    (16384, 2048, 7168, "V3 expert gate/up (7168 -> 2048)"),
    (16384, 7168, 2048, "V3 expert down (2048 -> 7168)"),
]
GROUPED_SHAPES = [  # (experts, total rows, N, K, label)
    (8, 16384, 2048, 7168, "V3 gate/up"),
    (8, 16384, 7168, 2048, "V3 down"),
    (32, 16384, 2048, 7168, "V3 gate/up"),
    (32, 16384, 7168, 2048, "V3 down"),
]
LINEAR_SHAPES = [  # (tokens, in_features, out_features, label, fp32 master weights under bf16 autocast)
    (16384, 7168, 2048, "V3 7168 -> 2048", False),
    (16384, 2048, 7168, "V3 2048 -> 7168", False),
    (8192, 8192, 8192, "square", False),
    (16384, 7168, 2048, "V3 7168 -> 2048", True),  # as `./run train` runs: fp32 parameters, bf16 autocast
    (16384, 2048, 7168, "V3 2048 -> 7168", True),
]
QUICK_GEMM = [(1024, 1024, 1024, "quick"), (2048, 1536, 2048, "quick")]
QUICK_GROUPED = [(4, 2048, 512, 1024, "quick"), (8, 2048, 1024, 512, "quick")]
QUICK_LINEAR = [(2048, 1024, 512, "quick", False), (2048, 1024, 512, "quick", True)]


# ---------------------------------------------------------------------------------------------- timing
def measure(row: dict, impls: dict[str, Callable[[], object]], flops: float, args, device) -> None:
    """row[name] = TFLOP/s of each implementation, or None and row[name_error] = the first line of
    its exception."""
    for name, fn in impls.items():
        try:
            ms = median_ms(fn, device, args.warmup_ms, args.rep_ms)
            row[name] = round(flops / ms / 1e9, 1)
        except Exception as e:  # a peer that does not take this shape (or a kernel that is not there)
            row[name] = None
            row[f"{name}_error"] = _first_line(e)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()


def add_ratios(row: dict, pairs: list[tuple[str, str]]) -> None:
    for ours, peer in pairs:
        if row.get(ours) and row.get(peer):
            row[f"ratio_{ours}_vs_{peer}"] = round(row[ours] / row[peer], 3)


def rel_err(row: dict, name: str, fn: Callable[[], torch.Tensor], reference: torch.Tensor, key: str = "") -> None:
    """row[key] (default rel_err_<name>) = ||fn() - reference|| / ||reference||, to 6 significant digits."""
    if row.get(name) is None:
        return
    key = key or f"rel_err_{name}"
    try:
        with torch.no_grad():
            out = fn().float()
            ref = reference.float()
            row[key] = float(f"{((out - ref).norm() / ref.norm().clamp_min(1e-30)).item():.6g}")
    except Exception as e:
        row[f"{key}_error"] = _first_line(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# ---------------------------------------------------------------------------------------------- moetron
def moetron_fp8():
    """The FP8 kernels module, or the ImportError as a string (rows then record it per implementation)."""
    try:
        from moetron.kernels import fp8

        return fp8
    except Exception as e:
        return _first_line(e)


def _need(module):
    if isinstance(module, str):
        raise RuntimeError(f"moetron.kernels.fp8 unavailable ({module})")
    return module


# ---------------------------------------------------------------------------------------------- sections
def gemm_rows(shapes, args, device) -> list[dict]:
    fp8 = moetron_fp8()
    return [_report(gemm_row(m, n, k, label, fp8, args, device)) for m, n, k, label in shapes]


def gemm_row(m, n, k, label, fp8, args, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen)  # (N, K): a linear's weight
    row = {"section": "gemm", "shape": {"M": m, "N": n, "K": k}, "what": label}
    impls: dict[str, Callable[[], torch.Tensor]] = {}
    try:
        f = _need(fp8)
        aq, a_s = f.quantize_1x128(a)
        bq, b_s = f.quantize_128x128(b)
        impls["moetron_fp8"] = lambda: f.fp8_gemm(aq, a_s, bq, b_s, out_dtype=torch.bfloat16)
        if device.type == "cuda":  # the Triton kernel alone (fp8_gemm takes the Gluon one on the H100)
            from moetron.kernels.fp8_gemm_triton import fp8_gemm_triton

            impls["moetron_fp8_triton"] = lambda: fp8_gemm_triton(aq, a_s, bq, b_s, torch.bfloat16, gluon=False)
        impls["moetron_fp8_quant"] = lambda: f.fp8_gemm(
            *f.quantize_1x128(a), *f.quantize_128x128(b), out_dtype=torch.bfloat16
        )
        a_sb, b_sb = blockwise_scales(a_s, b_s)
        impls["scaled_mm_blockwise"] = lambda: F.scaled_mm(
            aq,
            bq.t(),
            a_sb,
            F.ScalingType.BlockWise1x128,
            b_sb,
            F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        )
    except Exception as e:
        for name in ("moetron_fp8", "moetron_fp8_quant"):
            row[name], row[f"{name}_error"] = None, _first_line(e)
    impls["torch_bf16"] = lambda: torch.matmul(a, b.t())
    a_t, a_ts = tensorwise(a)
    b_t, b_ts = tensorwise(b)
    impls["scaled_mm_tensorwise"] = lambda: torch._scaled_mm(
        a_t, b_t.t(), scale_a=a_ts, scale_b=b_ts, out_dtype=torch.bfloat16
    )
    a_r, a_rs = rowwise(a, dim=1)  # scale (M, 1)
    b_r, b_rs = rowwise(b, dim=1)  # scale (N, 1) -> (1, N) for b^T
    b_rs = b_rs.t().contiguous()
    impls["scaled_mm_rowwise"] = lambda: torch._scaled_mm(
        a_r, b_r.t(), scale_a=a_rs, scale_b=b_rs, out_dtype=torch.bfloat16
    )
    measure(row, impls, 2.0 * m * n * k, args, device)
    reference = torch.matmul(a, b.t())
    for name in ("moetron_fp8", "scaled_mm_tensorwise", "scaled_mm_rowwise", "scaled_mm_blockwise"):
        if name in impls:
            rel_err(row, name, impls[name], reference)
    if row.get("moetron_fp8") and row.get("scaled_mm_blockwise"):
        rel_err(
            row, "moetron_fp8", impls["moetron_fp8"], impls["scaled_mm_blockwise"](), key="rel_diff_vs_cublas_blockwise"
        )
    add_ratios(
        row,
        [
            ("moetron_fp8", "scaled_mm_rowwise"),
            ("moetron_fp8", "scaled_mm_blockwise"),
            ("moetron_fp8", "scaled_mm_tensorwise"),
            ("moetron_fp8", "torch_bf16"),
            ("moetron_fp8_triton", "scaled_mm_rowwise"),
            ("moetron_fp8_quant", "scaled_mm_rowwise"),
            ("moetron_fp8_quant", "torch_bf16"),
        ],
    )
    return row


def grouped_rows(shapes, args, device) -> list[dict]:
    fp8 = moetron_fp8()
    return [
        _report(grouped_row(n_experts, total, n, k, label, aligned, fp8, args, device))
        for n_experts, total, n, k, label in shapes
        for aligned in (False, True)
    ]


def grouped_row(n_experts, total, n, k, label, aligned, fp8, args, device) -> dict:
    sizes = group_sizes(n_experts, total, aligned)
    m = sum(sizes)
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n_experts, n, k, device=device, dtype=torch.bfloat16, generator=gen)  # (E, N, K)
    row = {
        "section": "grouped", "shape": {"experts": n_experts, "M": m, "N": n, "K": k},
        "what": f"{label}, {'aligned to 128' if aligned else 'unaligned'} groups",
        "group_sizes": sizes,
    }  # fmt: skip
    impls: dict[str, Callable[[], torch.Tensor]] = {}
    try:
        f = _need(fp8)
        xq, x_s = f.quantize_1x128(x)
        wq, w_s = quantize_weight_grouped(f, w)
        impls["moetron_fp8"] = lambda: f.fp8_grouped_gemm(xq, x_s, wq, w_s, ends, out_dtype=torch.bfloat16)
        if device.type == "cuda":  # the Triton kernel alone (fp8_grouped_gemm takes the Gluon one on the H100)
            from moetron.kernels.fp8_gemm_triton import fp8_grouped_gemm_triton

            impls["moetron_fp8_triton"] = lambda: fp8_grouped_gemm_triton(
                xq, x_s, wq, w_s, ends, torch.bfloat16, gluon=False
            )
        impls["moetron_fp8_quant"] = lambda: f.fp8_grouped_gemm(
            *f.quantize_1x128(x), *quantize_weight_grouped(f, w), ends, out_dtype=torch.bfloat16
        )
        x_sb, w_sb = blockwise_scales(x_s, w_s)
        impls["scaled_grouped_mm_blockwise"] = lambda: F.scaled_grouped_mm(
            xq,
            wq.transpose(-2, -1),
            x_sb,
            F.ScalingType.BlockWise1x128,
            w_sb,
            F.ScalingType.BlockWise128x128,
            offs=ends,
            output_dtype=torch.bfloat16,
        )
    except Exception as e:
        for name in ("moetron_fp8", "moetron_fp8_quant"):
            row[name], row[f"{name}_error"] = None, _first_line(e)
    impls["grouped_mm_bf16"] = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    x_r, x_rs = rowwise(x, dim=1)  # (M, 1)
    w_r, w_rs = rowwise(w, dim=2)  # (E, N, 1)
    x_rs, w_rs = x_rs.reshape(m), w_rs.reshape(n_experts, n)
    impls["scaled_grouped_mm_rowwise"] = lambda: torch._scaled_grouped_mm(
        x_r, w_r.transpose(-2, -1), x_rs, w_rs, offs=ends, out_dtype=torch.bfloat16
    )
    measure(row, impls, 2.0 * m * n * k, args, device)
    try:
        reference = torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    except Exception:  # no _grouped_mm here (old GPU): the per-expert loop
        from moetron.kernels.grouped_gemm import grouped_gemm_reference

        reference = grouped_gemm_reference(x, w, ends)
    for name in ("moetron_fp8", "scaled_grouped_mm_rowwise", "scaled_grouped_mm_blockwise"):
        if name in impls:
            rel_err(row, name, impls[name], reference)
    add_ratios(
        row,
        [
            ("moetron_fp8", "grouped_mm_bf16"),
            ("moetron_fp8", "scaled_grouped_mm_rowwise"),
            ("moetron_fp8", "scaled_grouped_mm_blockwise"),
            ("moetron_fp8_triton", "grouped_mm_bf16"),
            ("moetron_fp8_quant", "grouped_mm_bf16"),
        ],
    )
    return row


def make_fp8_linear(in_features: int, out_features: int, device, dtype) -> nn.Module:
    from moetron.kernels.fp8_linear import FP8Linear

    return FP8Linear(in_features, out_features, bias=False, device=device, dtype=dtype)


def linear_rows(shapes, args, device) -> list[dict]:
    return [_report(linear_row(*shape, args, device)) for shape in shapes]


def linear_row(tokens, d_in, d_out, label, master_fp32, args, device) -> dict:
    """FP8Linear against nn.Linear, forward+backward of a bf16 input: with bf16 parameters, or (master_fp32)
    with fp32 parameters under bf16 autocast, as the trainer runs (nn.Linear then casts its weight every call,
    FP8Linear quantizes the fp32 weight and writes an fp32 weight gradient)."""
    what = f"fwd+bwd, {label}" + (", fp32 weights, bf16 autocast" if master_fp32 else "")
    row = {"section": "linear", "shape": {"M": tokens, "N": d_out, "K": d_in}, "what": what}
    param_dtype = torch.float32 if master_fp32 else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16, generator=gen)
    torch.manual_seed(0)
    bf16 = nn.Linear(d_in, d_out, bias=False, device=device, dtype=param_dtype)
    layers: dict[str, nn.Module] = {"torch_bf16": bf16}
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=master_fp32)
    try:
        fp8_layer = make_fp8_linear(d_in, d_out, device, param_dtype)
        with torch.no_grad():
            fp8_layer.weight.copy_(bf16.weight)
        layers["moetron_fp8"] = fp8_layer
    except Exception as e:
        row["moetron_fp8"], row["moetron_fp8_error"] = None, _first_line(e)

    def fwd_bwd(layer):
        def step():
            x.grad = None
            layer.weight.grad = None
            with autocast():
                y = layer(x)
            y.backward(grad)

        return step

    impls = {name: fwd_bwd(layer) for name, layer in layers.items()}
    measure(row, impls, 3 * 2.0 * tokens * d_out * d_in, args, device)
    if device.type == "cuda":
        for name, fn in impls.items():
            if row.get(name) is not None:
                row[f"kernels_us_{name}"] = kernel_breakdown_us(fn)
    if row.get("moetron_fp8") is not None:
        try:  # forward output and both gradients against the bf16 layer
            x.grad = bf16.weight.grad = None  # the timing loop left its last gradients
            with autocast():
                y_ref = bf16(x)
            y_ref.backward(grad)
            dx_ref, dw_ref = x.grad.clone(), bf16.weight.grad.clone()
            x.grad = None
            fp8_layer.weight.grad = None
            with autocast():
                y = fp8_layer(x)
            y.backward(grad)
            for what, got, ref in (("y", y, y_ref), ("dx", x.grad, dx_ref), ("dw", fp8_layer.weight.grad, dw_ref)):
                got, ref = got.float(), ref.float()
                row[f"rel_err_moetron_fp8_{what}"] = round(((got - ref).norm() / ref.norm()).item(), 4)
        except Exception as e:
            row["rel_err_moetron_fp8_error"] = _first_line(e)
    add_ratios(row, [("moetron_fp8", "torch_bf16")])
    return row


# ---------------------------------------------------------------------------------------------- report
COLUMNS = {
    "gemm": [
        "moetron_fp8",
        "moetron_fp8_triton",
        "moetron_fp8_quant",
        "torch_bf16",
        "scaled_mm_tensorwise",
        "scaled_mm_rowwise",
        "scaled_mm_blockwise",
    ],
    "grouped": [
        "moetron_fp8",
        "moetron_fp8_triton",
        "moetron_fp8_quant",
        "grouped_mm_bf16",
        "scaled_grouped_mm_rowwise",
        "scaled_grouped_mm_blockwise",
    ],
    "linear": ["moetron_fp8", "torch_bf16"],
}


def _report(row: dict) -> dict:
    print(json.dumps({k: v for k, v in row.items() if k != "group_sizes"}), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    for section, columns in COLUMNS.items():
        chosen = [r for r in rows if r["section"] == section]
        if not chosen:
            continue
        ratio_keys = sorted({k for r in chosen for k in r if k.startswith("ratio_")})
        header = ["shape", "what", *columns, *(k.removeprefix("ratio_") for k in ratio_keys)]
        print(f"\n{section} (TFLOP/s; shape M x N x K{', E experts' if section == 'grouped' else ''})")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in chosen:
            shape = "x".join(str(r["shape"][k]) for k in "MNK")
            if "experts" in r["shape"]:
                shape = f"E={r['shape']['experts']} {shape}"
            cells = [shape, r["what"], *(_cell(r.get(c)) for c in columns), *(_cell(r.get(k)) for k in ratio_keys)]
            print("| " + " | ".join(cells) + " |")
        errors = sorted(
            {f"{k.removesuffix('_error')}: {v}" for r in chosen for k, v in r.items() if k.endswith("_error")}
        )
        for line in errors:
            print(f"  error {line}")


def _cell(value) -> str:
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here (bench/results/fp8.json)")
    parser.add_argument("--git-sha", default="unknown")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test of every path")
    parser.add_argument("--sections", default="gemm,grouped,linear", help="comma-separated subset")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=300.0, help="timed calls per case: about this long")
    parser.add_argument(
        "--device", default="cuda", help="cuda; or cpu to check the wiring with --quick (timings meaningless)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(
                "bench/fp8.py: no CUDA device visible. It times FP8 GEMMs on a GPU with FP8 tensor cores "
                "(compute capability >= 8.9; H100/H200); on a CPU only `--device cpu --quick` runs, to check "
                "the wiring (no meaningful timings)."
            )
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            sys.exit(
                f"bench/fp8.py: {torch.cuda.get_device_name()} has compute capability {capability}; FP8 needs >= 8.9"
            )
    elif not args.quick:
        sys.exit("bench/fp8.py: --device cpu is a wiring check and needs --quick")
    sections = args.sections.split(",")
    unknown = set(sections) - set(COLUMNS)
    if unknown:
        sys.exit(f"bench/fp8.py: unknown --sections {sorted(unknown)}; valid: {list(COLUMNS)}")

    start = time.time()
    if device.type == "cuda" and not args.quick:
        # Warm-up, discarded: measured first in a fresh process, the first shape came out up to 25% slow and
        # varied run to run (every column, the peers' too: clocks, autotuning, first launches).
        gemm_row(*GEMM_SHAPES[0], moetron_fp8(), args, device)
    rows: list[dict] = []
    if "gemm" in sections:
        rows += gemm_rows(QUICK_GEMM if args.quick else GEMM_SHAPES, args, device)
    if "grouped" in sections:
        rows += grouped_rows(QUICK_GROUPED if args.quick else GROUPED_SHAPES, args, device)
    if "linear" in sections:
        rows += linear_rows(QUICK_LINEAR if args.quick else LINEAR_SHAPES, args, device)
    print_table(rows)
    print(f"\n{time.time() - start:.0f} s")

    if args.out:
        out = {
            "benchmark": "fp8", "unit": "TFLOP/s", "command": " ".join(sys.argv), "git_sha": args.git_sha,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "timing": f"CUDA events per call, median, warm-up {args.warmup_ms} ms, ~{args.rep_ms} ms of calls, no flush",
            "results": rows,
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
