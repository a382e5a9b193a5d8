"""bench/fp8_siblings.py's wiring on the CPU (a tiny MLA + MoE model, one round): the three variants run, and
the sibling projections as one GEMM give the loss of the layers called one by one."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_siblings_bench_runs_and_the_variants_agree(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fp8_siblings.py"), "--out", str(out), "--preset", "moe_debug",
           "--layers", "2", "--batch", "1", "--seq", "64", "--rounds", "1", "--iters", "1",
           "--set", "q_lora_rank=128", "kv_lora_rank=128", "moe_ffn_hidden=128"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"bf16", "bf16 together", "fp8 together", "fp8 one by one"}
    assert all(ms > 0 for ms in result["median_ms"].values()) and result["device"] == "cpu"
    loss = result["last_loss"]
    assert abs(loss["fp8 together"] - loss["fp8 one by one"]) < 1e-4 * loss["fp8 one by one"]
    assert loss["fp8 together"] != loss["bf16"]  # FP8 did run
    assert abs(loss["bf16 together"] - loss["bf16"]) < 1e-4 * loss["bf16"]  # the same math in BF16 ...
    assert result["bf16_stacked_calls"] > 0  # ... through the stacked weights (the patch reached the model)
