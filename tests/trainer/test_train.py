"""End-to-end training runs on CPU: presets, data parallelism, exact resume, multirun, wandb, NaN guard, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from moetron.config import ConfigError, to_train_config, validate
from moetron.model import list_presets
from moetron.parallel.mesh import ParallelConfigError
from moetron.train import run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
WORKER = str(ROOT / "tests" / "trainer" / "train_worker.py")


def fast(cache_dir, run_dir, *extra):
    """Overrides for a small, quick CPU run."""
    return [
        "model=tiny", "data.seq_len=64", "data.micro_batch_size=4", f"data.cache_dir={cache_dir}",
        "logging.wandb=false", "logging.console=false", "logging.log_every=1", "optim.warmup_steps=2",
        "trainer.device=cpu", "trainer.eval_every=0", f"trainer.run_dir={run_dir}", *extra,
    ]  # fmt: skip


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def losses(run_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last line of a step wins: a resumed run rewrites it)."""
    out = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            out[record["step"]] = record["loss"]
    return out


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.mark.parametrize("group", ["model", "data", "optim", "parallel", "logging"])
def test_every_preset_composes_and_validates(group, tmp_path):
    presets = sorted(p.stem for p in Path(CONFIGS, group).glob("*.yaml"))
    assert presets
    if group == "model":
        assert presets == list_presets()
    for name in presets:
        extra = [f"data.path={tmp_path}"] if (group, name) == ("data", "bin") else []
        if extra:
            (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 100}))
        cfg = to_train_config(compose_cfg([f"{group}={name}", *extra]))
        validate(cfg, world_size=1)
        assert cfg.trainer.run_dir.startswith("runs/")
        if group == "model":  # the composed model is exactly the preset (no derived defaults leak in)
            from moetron.model import ModelConfig

            assert cfg.model == ModelConfig.from_preset(name)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["model.top_k=99"], ConfigError, r"top_k=99 must be in \[1, n_routed_experts=4\]"),
        (["optim.schedule=linear"], ConfigError, r"optim.schedule: 'linear' is not one of"),
        (["data.seq_len=100000"], ConfigError, r"data.seq_len: 100000 exceeds model.max_seq_len"),
        (["trainer.activation_checkpointing=some"], ConfigError, r"trainer.activation_checkpointing"),
        (["data=bin", "data.path=/nonexistent"], ConfigError, r"data.path: /nonexistent has no meta.json"),
        (["parallel.tp=2"], ParallelConfigError, r"world size 1 is not divisible by tp\*pp\*cp=2"),
        (["parallel.dp=3"], ParallelConfigError, r"dp\*tp\*pp\*cp = 3\*1\*1\*1 = 3 must equal the world size 1"),
        (["trainer.resume=/no/such/checkpoint"], ConfigError, r"trainer.resume"),
    ],
)
def test_bad_configs_fail_naming_the_field(overrides, error, message, cache_dir, tmp_path):
    cfg = compose_cfg(fast(cache_dir, tmp_path, *overrides))
    with pytest.raises(error, match=message):
        run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # failed before anything was built


@pytest.mark.parametrize("degree", ["tp", "pp", "cp", "ep"])
def test_unimplemented_degrees_are_refused_with_their_names(degree, cache_dir, tmp_path):
    cfg = to_train_config(compose_cfg(fast(cache_dir, tmp_path, f"parallel.{degree}=2", "data.seq_len=64")))
    with pytest.raises(ParallelConfigError, match=rf"{degree}=2: only data parallelism is implemented"):
        validate(cfg, world_size=2 if degree == "ep" else 4)


def test_cli_rejects_bad_config_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moetron.train", "model=tiny", "optim.lr=-1", f"trainer.run_dir={tmp_path}"],
        capture_output=True, text=True, env=env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid configuration: optim.lr: -1.0 must be > 0" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "moetron.train", "optim.lrr=1"], capture_output=True, text=True, env=env(), timeout=120
    )
    assert proc.returncode != 0 and "optim.lrr" in proc.stderr


def one_rank_and_two_ranks(cache_dir, tmp_path, steps: int, *extra: str) -> tuple[dict, dict]:
    """The same run as 1 rank x 2 accumulated micro-batches and as 2 gloo ranks x 1 (torchrun), each in its own
    process with the same environment (one CPU thread), under tmp_path/one and tmp_path/two: their step -> loss."""
    common = fast(cache_dir, "X", f"trainer.steps={steps}", "trainer.checkpoint_every=0", *extra)
    one = [o.replace("trainer.run_dir=X", f"trainer.run_dir={tmp_path / 'one'}") for o in common]
    two = [o.replace("trainer.run_dir=X", f"trainer.run_dir={tmp_path / 'two'}") for o in common]
    subprocess.run([sys.executable, WORKER, *one, "trainer.grad_accum=2"], check=True, env=env(), timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "moetron.train", *two, "trainer.grad_accum=1"],
        capture_output=True, text=True, env=env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(tmp_path / "one"), losses(tmp_path / "two")


def straight_and_resumed(cache_dir, tmp_path, steps: int, checkpoint_every: int, kill_at: int, *extra: str) -> dict:
    """The same run straight (tmp_path/straight) and killed with SIGKILL after step `kill_at`, then resumed
    (tmp_path/crashed): what a resume test checks (the kill's exit status, the steps and checkpoints before the
    resume, both runs' step -> loss)."""
    args = fast(cache_dir, "X", f"trainer.steps={steps}", f"trainer.checkpoint_every={checkpoint_every}",
                "trainer.keep_last=2", *extra)  # fmt: skip
    straight = [o.replace("X", str(tmp_path / "straight")) for o in args]
    crashed = [o.replace("X", str(tmp_path / "crashed")) for o in args]
    subprocess.run([sys.executable, WORKER, *straight], check=True, env=env(), timeout=600)
    killed = subprocess.run([sys.executable, WORKER, "--kill-at", str(kill_at), *crashed], env=env(), timeout=600)
    out = {"killed_returncode": killed.returncode, "steps_before": sorted(losses(tmp_path / "crashed"))}
    out["checkpoints"] = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir() if p.name[0] != ".")
    subprocess.run([sys.executable, WORKER, *crashed], check=True, env=env(), timeout=600)
    out["straight"], out["resumed"] = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    return out


def test_data_parallel_two_ranks_equal_one_rank(cache_dir, tmp_path):
    """2 gloo ranks x micro-batch 4 == 1 rank x 2 accumulated micro-batches of 4, step by step."""
    a, b = one_rank_and_two_ranks(cache_dir, tmp_path, 10, "model.mtp_depth=1")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[10] < a[1] - 0.1  # and it learns


def test_exact_resume_after_kill(cache_dir, tmp_path):
    """20 steps straight == 13 steps, SIGKILL (last checkpoint: step 10), resume to 20: every step's loss."""
    r = straight_and_resumed(cache_dir, tmp_path, 20, 5, 13)
    assert r["killed_returncode"] == -9
    assert r["steps_before"] == list(range(1, 14))
    assert r["checkpoints"][-1] == "step_00000010"
    a, b = r["straight"], r["resumed"]
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_multirun_sweep_gives_each_run_its_directory_and_wandb_run(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [
        o for o in fast(cache_dir, "X", "trainer.steps=3") if not o.startswith(("trainer.run_dir", "logging.wandb"))
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "moetron.train", "-m", *overrides, "optim.lr=1e-3,2e-3", "logging.wandb=true",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env={**env(), "WANDB_API_KEY": ""}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert runs[0].name.startswith("0_") and "optim.lr=0.001" in runs[0].name and "cache_dir" not in runs[0].name
    assert runs[1].name.startswith("1_") and "optim.lr=0.002" in runs[1].name
    for run_dir, lr in zip(runs, (1e-3, 2e-3)):
        saved = (run_dir / "config.yaml").read_text()
        assert f"lr: {lr}" in saved
        assert sorted(losses(run_dir)) == [1, 2, 3]
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_nan_guard(cache_dir, tmp_path):
    from moetron.trainer.step import NonFiniteError

    def poison(trainer, step, result):
        if step == 2:
            with torch.no_grad():
                trainer.plain.embed.weight[:] = float("nan")

    cfg = compose_cfg(fast(cache_dir, tmp_path, "trainer.steps=6", "trainer.nan_policy=stop"))
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss=nan, lm_loss=nan.*nan_policy=stop"):
        run(cfg, run_dir=tmp_path, callbacks=[poison])

    cfg = compose_cfg(fast(cache_dir, tmp_path / "skip", "trainer.steps=6", "trainer.max_skipped_steps=2"))
    with pytest.raises(NonFiniteError, match=r"3 steps in a row skipped"):
        run(cfg, run_dir=tmp_path / "skip", callbacks=[poison])
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert math.isfinite(records[1]["loss"])


def test_request_stop_and_save_final(cache_dir, tmp_path):
    """A callback can end a run early (trainer.request_stop()); trainer.save_final=false skips the checkpoint
    after the last step, true (the default) writes it at the step the run ended."""

    def stop_at_2(trainer, step, result):
        if step == 2:
            trainer.request_stop()

    for save_final in (False, True):
        run_dir = tmp_path / str(save_final)
        extra = ("trainer.steps=6", "trainer.checkpoint_every=0", f"trainer.save_final={save_final}")
        run(compose_cfg(fast(cache_dir, run_dir, *extra)), run_dir=run_dir, callbacks=[stop_at_2])
        assert sorted(losses(run_dir)) == [1, 2]
        saved = (
            sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
            if (run_dir / "checkpoints").exists()
            else []
        )
        assert saved == ([] if not save_final else ["step_00000002"]), saved


def test_activation_checkpointing_and_bf16_train(cache_dir, tmp_path):
    for mode in ("full", "selective"):
        cfg = compose_cfg(
            fast(cache_dir, tmp_path / mode, "trainer.steps=3", f"trainer.activation_checkpointing={mode}",
                 "trainer.precision=bf16")
        )  # fmt: skip
        run(cfg, run_dir=tmp_path / mode)
        assert all(math.isfinite(v) for v in losses(tmp_path / mode).values())


def test_init_from_a_moetron_checkpoint(cache_dir, tmp_path):
    from moetron.config import to_train_config
    from moetron.model import ModelConfig, Transformer
    from moetron.model.io import save_moetron
    from moetron.parallel.mesh import ParallelDims, ParallelMesh
    from moetron.trainer.trainer import Trainer

    torch.manual_seed(123)
    source = Transformer(ModelConfig.from_preset("tiny"))
    save_moetron(source, tmp_path / "init")
    cfg = to_train_config(compose_cfg(fast(cache_dir, tmp_path / "run", f"trainer.init_from={tmp_path / 'init'}")))
    trainer = Trainer(cfg, ParallelMesh(ParallelDims(dp=1), "cpu"), tmp_path / "run")
    for name, tensor in source.state_dict().items():
        assert torch.equal(trainer.plain.state_dict()[name], tensor), name
    trainer.metrics.close()


def test_step_reports_the_embeddings_gradient_norm_before_clipping(cache_dir, tmp_path):
    """StepResult.grad_norm_embed (and metrics.jsonl's grad_norm/embed): the token embedding's part of the
    gradient norm, taken before clipping (a clip of 1e-6 would otherwise shrink it to at most that)."""
    seen = []
    cfg = compose_cfg(fast(cache_dir, tmp_path, "trainer.steps=3", "optim.grad_clip=1e-6"))
    run(cfg, run_dir=tmp_path, callbacks=[lambda trainer, step, result: seen.append(result)])
    assert len(seen) == 3
    for result in seen:
        assert 1e-3 < result.grad_norm_embed <= result.grad_norm  # a part of the whole, unclipped
    logged = [json.loads(line)["grad_norm/embed"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([r.grad_norm_embed for r in seen])
