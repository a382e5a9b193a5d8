"""Runs tests/kernels/interpreted in a separate process with TRITON_INTERPRET=1 set before Triton loads.

Triton decides at decoration time whether a kernel is compiled or interpreted, and caches the setting;
flipping the variable inside this process would leave a mix of both (and would make every CPU model
test pick the slow interpreted attention)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted: run directly")
@pytest.mark.parametrize(
    "target, extra_env",
    [
        ("interpreted", {}),
        # The attention kernels' second load path (pointers instead of tensor descriptors).
        ("interpreted/test_attention_triton.py", {"MOETRON_ATTN_TMA": "0"}),
    ],
)
def test_kernels_under_the_interpreter(target, extra_env):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE.parents[1]), **extra_env}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / target)],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
