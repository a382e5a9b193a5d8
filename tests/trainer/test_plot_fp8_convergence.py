"""bench/plot_fp8_convergence.py draws a comparison, with the noise floor's run beside it (--floor), and refuses a
floor of another setting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLOT = str(ROOT / "bench" / "plot_fp8_convergence.py")


def record(losses: list[float]) -> dict:
    n = len(losses)
    curve = {"step": list(range(1, n + 1)), "loss": losses, "lm_loss": losses, "grad_norm": [1.0] * n}
    return {
        "steps_done": n,
        "curve": curve,
        "eval": {"step": [n], "loss": [losses[-1] - 1]},
        "tokens_per_sec_median": 1e3,
    }


def comparison(a: float, b: float, second: str) -> dict:
    return {"steps_compared": 3, "final_window": 10, "final_loss_bf16": a, f"final_loss_{second}": b,
            "rel_diff": (b - a) / a, "target_rel_diff": 0.01, "passed": True}  # fmt: skip


def test_plot_with_the_noise_floor(tmp_path):
    pytest.importorskip("matplotlib")
    common = ["model=tiny", "trainer.seed=0"]
    pair = {"model": "tiny", "device": "cpu", "date": "2026-12-08", "git_sha": "abc", "complete": True,
            "common_overrides": common, "runs": {"bf16": record([3.0, 2.0, 1.0]),
                                                 "fp8": record([3.0, 2.1, 1.01])},
            "comparison": comparison(1.0, 1.01, "fp8")}  # fmt: skip
    floor = {**pair, "runs": {"bf16": pair["runs"]["bf16"], "bf16_b": record([3.0, 1.9, 1.02])},
             "second_run": {"name": "bf16_b", "overrides": ["kernels.backend=sdpa"]},
             "comparison": comparison(1.0, 1.02, "bf16_b")}  # fmt: skip
    (tmp_path / "pair.json").write_text(json.dumps(pair))
    (tmp_path / "floor.json").write_text(json.dumps(floor))
    out = tmp_path / "p.png"
    cmd = [
        sys.executable,
        PLOT,
        str(tmp_path / "pair.json"),
        "--floor",
        str(tmp_path / "floor.json"),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    other = {**floor, "common_overrides": ["model=tiny", "trainer.seed=1"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    cmd[4] = str(tmp_path / "other.json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not a noise floor" in proc.stderr
