"""Attention throughput on one GPU: moetron's kernels vs torch SDPA (FlashAttention-2 and cuDNN
backends), forward and forward+backward, in TFLOP/s, side by side in one run.

Every implementation is timed --rounds times (default 3), the implementations alternating within a
round, and the median reported (each timing: triton.testing.do_bench, 25 ms warm-up, 100 ms of calls);
the rounds are kept in the JSON. FLOPs: forward 4 * batch * heads * seq_q * seq_k * (d_qk + d_v) / 2
(two matmuls), halved when causal; backward 2.5x forward (five matmuls, the FlashAttention papers' convention). Writes JSON with the
command, git sha, device and versions.

Columns: `moetron_triton` is flash_attention(backend="triton") as dispatched (on an H100 the forward of
the head dims attention_gluon.HEAD_DIMS runs the warp-specialized Gluon kernel); `triton_kernel` is the
same call with MOETRON_ATTN_GLUON=0 (the Triton kernels only).

    python bench/attention.py --out bench/results/attention.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moetron.kernels import attention_gluon, attention_triton_kernels, flash_attention

SHAPES = [  # (batch, heads, seq, d_qk, d_v)
    (4, 32, 4096, 128, 128),
    (2, 16, 8192, 128, 128),
    (8, 32, 2048, 64, 64),
    (4, 16, 4096, 192, 128),  # MLA
]


def flops(batch, heads, seq, d_qk, d_v, causal, mode):
    fwd = 2 * batch * heads * seq * seq * (d_qk + d_v) / (2 if causal else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


def timed(fn, mode):
    if mode == "fwd":
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    def step():
        out = fn()
        out.backward(grad_out[0])

    grad_out = [None]
    out = fn()
    grad_out[0] = torch.randn_like(out)
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=None)


@contextlib.contextmanager
def gluon_off(name):
    """For the `triton_kernel` column: MOETRON_ATTN_GLUON=0 around the whole timing (forward and backward)."""
    if name != "triton_kernel":
        yield
        return
    os.environ["MOETRON_ATTN_GLUON"] = "0"
    try:
        yield
    finally:
        os.environ.pop("MOETRON_ATTN_GLUON")


def chosen_configs(mode, q, v, causal):
    """The autotuner's pick for the shape just timed (tile, warps, stages, tensor descriptors or not), and
    which forward kernel flash_attention dispatched to."""
    kernels = {"fwd": attention_triton_kernels._fwd_kernel}
    if mode == "fwd_bwd":
        kernels.update(dkdv=attention_triton_kernels._bwd_dkdv_kernel, dq=attention_triton_kernels._bwd_dq_kernel)
    configs = {name: str(getattr(kernel, "best_config", None)) for name, kernel in kernels.items()}
    if attention_gluon.supported(q, q, v):
        consumers = attention_gluon._consumers(q.shape[-1], v.shape[-1], None)
        configs["fwd_moetron_triton"] = f"gluon: persistent, {consumers} consumer warpgroups x 64 rows, 128-key blocks"
    return configs


def save(args, rows):
    out = {
        "benchmark": "attention", "unit": "TFLOP/s", "command": " ".join(sys.argv), "git_sha": args.git_sha,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "results": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default="unknown")
    parser.add_argument("--rounds", type=int, default=3, help="timings per implementation, alternated; the median")
    args = parser.parse_args()
    rows = []
    for batch, heads, seq, d_qk, d_v in SHAPES:
        for causal in (False, True):
            q = torch.randn(batch, seq, heads, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(batch, seq, heads, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(batch, seq, heads, d_v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            impls = {
                "moetron_triton": lambda q=q, k=k, v=v, causal=causal: flash_attention(
                    q, k, v, causal=causal, backend="triton"
                ),
                "triton_kernel": lambda q=q, k=k, v=v, causal=causal: flash_attention(
                    q, k, v, causal=causal, backend="triton"
                ),
            }
            for name, backend in (
                ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ):

                def sdpa(backend=backend, qt=qt, kt=kt, vt=vt, causal=causal):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                impls[name] = sdpa
            for mode in ("fwd", "fwd_bwd"):
                row = {"shape": [batch, heads, seq, d_qk, d_v], "causal": causal, "mode": mode}
                work = flops(batch, heads, seq, d_qk, d_v, causal, mode)
                rates = {name: [] for name in impls}
                for _ in range(args.rounds):  # the implementations alternate, so drift hits them alike
                    for name, fn in impls.items():
                        if f"{name}_error" in row:
                            continue
                        try:
                            with gluon_off(name):
                                rates[name].append(round(work / timed(fn, mode) / 1e9, 1))
                        except Exception as e:  # a backend that does not take this shape
                            row[f"{name}_error"] = str(e).splitlines()[0][:160]
                for name, values in rates.items():
                    row[name] = statistics.median(values) if values else None
                    if len(values) > 1:
                        row[f"{name}_rounds"] = values
                row["moetron_configs"] = chosen_configs(mode, q, v, causal)
                for peer in ("sdpa_flash", "sdpa_cudnn", "triton_kernel"):
                    if row.get(peer) and row.get("moetron_triton"):
                        row[f"ratio_vs_{peer}"] = round(row["moetron_triton"] / row[peer], 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
                save(args, rows)  # after every row: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
