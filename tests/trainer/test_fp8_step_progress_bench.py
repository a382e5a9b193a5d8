"""bench/fp8_step_progress.py on the CPU (3 steps of a tiny model): the measurement leaves the run unperturbed (the
same losses with and without it), its numbers are finite and plausible, and with an FP8 "twin" that is the BF16
model itself every difference is exactly zero (the bookkeeping: gradients cleared per batch, parameters matched by
name)."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--steps", "3", "--full-batches", "2", "--batches", "2", "--device", "cpu", "--seq-len", "64",
        "--micro-batch", "2", "--model", "moe_debug", "--warmup-steps", "1",
        "--override", "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.moe_ffn_hidden=128"]  # fmt: skip


def run_bench(tmp_path, at):
    out = tmp_path / f"p{at}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "fp8_step_progress.py"),
        "--out",
        str(out),
        "--work",
        str(tmp_path / f"w{at}"),
    ]
    subprocess.run([*cmd, "--at", str(at), *TINY], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_measurement_leaves_the_run_unperturbed(tmp_path):
    measured, plain = run_bench(tmp_path, 2), run_bench(tmp_path, 99)  # (99: never reached in 3 steps)
    assert measured["losses"] == plain["losses"] and len(plain["losses"]) == 3
    assert plain["measurements"] == []
    (m,) = measured["measurements"]
    assert m["step"] == 2 and all(math.isfinite(m[k]) for k in ("progress", "noise", "rel"))
    assert 0 < m["rel"] < 0.2 and m["noise"] > 0  # FP8 against fp32 (CPU): a few percent of error
    assert abs(m["loss_fp8"] - m["loss_bf16"]) < 1e-2 * m["loss_bf16"]


def test_identical_twin_gives_zero(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import fp8_step_progress as sp
    from fp8_convergence import common_overrides, compose

    from moetron.train import run

    args = sp.argparse.Namespace(
        model="moe_debug", seq_len=64, micro_batch=2, steps=2, warmup_steps=1, seed=0, device="cpu",
        activation_checkpointing="none", eval_batches=0, val_fraction=0.15, data_path=None,
        override=["model.q_lora_rank=128", "model.kv_lora_rank=128", "model.moe_ffn_hidden=128"],
    )  # fmt: skip
    results = []
    attribution = sp.Attribution([2], 2, 2, results.append)
    attribution._fp8_model = lambda trainer: attribution.__dict__.setdefault("twin", copy.deepcopy(trainer.plain))
    overrides = [*common_overrides(args), "model.fp8.enabled=false", f"trainer.run_dir={tmp_path}"]
    run(compose(overrides), run_dir=str(tmp_path), callbacks=[attribution])
    (m,) = results[-1]
    assert m["progress"] == 0.0 and m["noise"] == 0.0 and m["rel"] == 0.0
    assert m["loss_fp8"] == m["loss_bf16"]
