"""bench/tables.py fp8_convergence: a row per recorded comparison, and per setting run at several seeds the mean and
range of FP8's differences (settings differing in anything but the seed and bookkeeping are kept apart)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def result(seed: int, rel_diff: float, extra=(), eval_rel_diff=None) -> dict:
    common = ["model=deepseek_v3_mini", "optim.warmup_steps=100", f"trainer.seed={seed}", *extra]
    return {
        "common_overrides": common, "device": "NVIDIA H100 80GB HBM3", "git_sha": "0123456789",
        "comparison": {"steps_compared": 300, "final_loss_bf16": 5.0, "final_loss_fp8": 5.0 * (1 + rel_diff),
                       "rel_diff": rel_diff, "eval_rel_diff": eval_rel_diff},
    }  # fmt: skip


def test_rows_and_the_mean_over_seeds(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from tables import fp8_convergence
    finally:
        sys.path.pop(0)
    files = {
        "a_seed0.json": result(0, 0.01, eval_rel_diff=0.02),
        "a_seed1.json": result(1, -0.03, ["trainer.save_final=false"], eval_rel_diff=0.0),  # (bookkeeping only)
        "b_seed0.json": result(0, 0.05, ["data.val_fraction=0.15"]),  # another split: another setting
        "c_empty.json": {**result(2, 0.0), "comparison": {"steps_compared": 0}},  # a failed pair: no row
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    table = fp8_convergence(sorted(tmp_path.glob("*.json")))
    rows, summary = table.split("\n\n")
    assert [line.split(" | ")[0] for line in rows.splitlines()[2:]] == ["| a_seed0.json", "| a_seed1.json",
                                                                       "| b_seed0.json"]  # fmt: skip
    assert "| +1.00% | +2.00% |" in rows and "| -3.00% | +0.00% |" in rows and "| +5.00% | - |" in rows
    (line,) = summary.splitlines()[2:]
    assert "| 0, 1 | -1.00% (-3.00 to +1.00) | +1.00% over 2 |" in line
