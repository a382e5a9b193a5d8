"""bench/fp8_fusions.py's wiring on the CPU (a tiny MLA + MoE model, one round, the model section): the five
variants run, the fusions give losses within FP8's rounding of the model without them, and the BF16 patch reaches
the model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_fusions_bench_runs_and_the_variants_agree(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fp8_fusions.py"), "--out", str(out), "--preset", "moe_debug",
           "--layers", "2", "--batch", "1", "--seq", "64", "--rounds", "1", "--iters", "1",
           "--set", "q_lora_rank=128", "kv_lora_rank=128", "moe_ffn_hidden=128"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    model = result["model"]
    assert set(model["median_ms"]) == {
        "fp8", "fp8 norm apart", "fp8 swiglu apart", "fp8 one by one", "bf16", "bf16 together"
    }  # fmt: skip
    assert all(ms > 0 for ms in model["median_ms"].values()) and result["device"] == "cpu"
    assert "layer" not in result  # (GPU only)
    loss = model["last_loss"]
    assert loss["fp8"] != loss["fp8 swiglu apart"]  # the fused SwiGLU ran (it skips h's bf16 rounding) ...
    for name in ("fp8 swiglu apart", "fp8 norm apart", "fp8 one by one"):  # ... and every variant within FP8's noise
        assert abs(loss["fp8"] - loss[name]) < 2e-3 * loss[name]
    assert model["fused_swiglu_modules"] > 0 and model["fused_norm_modules"] > 0
    assert loss["fp8"] != loss["bf16"]  # FP8 did run
    assert abs(loss["bf16 together"] - loss["bf16"]) < 1e-4 * loss["bf16"]  # the same math in BF16 ...
    assert model["bf16_stacked_calls"] > 0  # ... through the stacked weights (the patch reached the model)
