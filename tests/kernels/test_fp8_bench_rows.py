"""bench/fp8.py's rows on the CPU (timings meaningless): every implementation gets a number or its error, and the
cuBLAS block-scaled peer gets moetron's quantized operands in the layouts cuBLAS reads. On the GPU machine the
peer runs and the row also holds the two outputs' relative difference; on the CPU torch has no block-scaled
kernel, so the row must record the error instead and leave the difference out."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fp8 as bench_fp8
        import fp8_operands

        yield bench_fp8, fp8_operands
    finally:
        sys.path.remove(str(ROOT / "bench"))


ARGS = Namespace(warmup_ms=0.0, rep_ms=0.0)


def test_blockwise_scale_layouts(bench):
    _, operands = bench
    a_scale, b_scale = torch.randn(256, 4), torch.randn(3, 2, 4)  # (M, K/128); (E, N/128, K/128)
    a_sb, b_sb = operands.blockwise_scales(a_scale, b_scale)
    assert torch.equal(a_sb, a_scale) and a_sb.stride() == (1, 256)  # the same values, M-major
    assert b_sb.shape == (3, 4, 2) and torch.equal(b_sb, b_scale.transpose(-2, -1))


def test_gemm_row_records_every_peer(bench):
    bench_fp8, _ = bench
    row = bench_fp8.gemm_row(256, 384, 256, "test", bench_fp8.moetron_fp8(), ARGS, torch.device("cpu"))
    for name in bench_fp8.COLUMNS["gemm"]:
        if name == "moetron_fp8_triton":  # (GPU only)
            continue
        assert row[name] is not None or f"{name}_error" in row, name
    assert row["moetron_fp8"] is not None and 0.01 < row["rel_err_moetron_fp8"] < 0.06  # FP8's error, not a wrong GEMM
    if row["scaled_mm_blockwise"] is None:  # no block-scaled kernel here: the error, and no difference
        assert row["scaled_mm_blockwise_error"] and "rel_diff_vs_cublas_blockwise" not in row
    else:  # the same sum twice: rounding-small
        assert row["rel_diff_vs_cublas_blockwise"] < 1e-2


def test_grouped_row_records_every_peer(bench):
    bench_fp8, _ = bench
    row = bench_fp8.grouped_row(4, 512, 256, 256, "test", True, bench_fp8.moetron_fp8(), ARGS, torch.device("cpu"))
    assert sum(row["group_sizes"]) == row["shape"]["M"] and all(s % 128 == 0 for s in row["group_sizes"])
    for name in bench_fp8.COLUMNS["grouped"]:
        if name == "moetron_fp8_triton":
            continue
        assert row[name] is not None or f"{name}_error" in row, name
    assert row["moetron_fp8"] is not None and 0.01 < row["rel_err_moetron_fp8"] < 0.06
