"""`python -m moetron.train [overrides]`: compose the config, validate it, start torch.distributed, train.

Order matters: the config is validated (ConfigError names the field) before any process group is
made, so a typo costs seconds, not a queue slot. Launch one process per GPU with torchrun
(`launch/torchrun.sh` does the bookkeeping); a plain `python -m moetron.train` is one process.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from moetron.config import ConfigError, TrainConfig, register_configs, to_train_config, validate
from moetron.parallel.mesh import ParallelConfigError, ParallelDims, ParallelMesh

register_configs()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(cfg: TrainConfig, world_size: int) -> ParallelMesh:
    """Process group (NCCL on GPU, gloo on CPU) and the ParallelMesh of the run."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    use_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    device_type = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return ParallelMesh(dims, device_type)


def agree_on_run_dir(run_dir: str, mesh: ParallelMesh) -> Path:
    """Rank 0's run directory for everyone (ranks may resolve ${now:...} a second apart)."""
    if mesh.distributed:
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        if box[0] != run_dir and Path(run_dir).is_dir() and not any(Path(run_dir).iterdir()):
            Path(run_dir).rmdir()  # the empty directory Hydra made for this rank's own timestamp
        run_dir = box[0]
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cfg: DictConfig | TrainConfig, run_dir: str | None = None, callbacks=()) -> None:
    """Validate, set up, train. `run_dir` defaults to Hydra's output directory of this job;
    `callbacks` are called as fn(trainer, step, step_result) after every optimizer step."""
    from moetron.trainer.trainer import Trainer

    world_size = world_size_from_env()
    train_cfg = to_train_config(cfg)
    validate(train_cfg, world_size)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    mesh = init_distributed(train_cfg, world_size)
    try:
        path = agree_on_run_dir(str(run_dir), mesh)
        if mesh.rank == 0:
            resolved = OmegaConf.to_yaml(OmegaConf.structured(train_cfg))
            (path / "config.yaml").write_text(resolved)
        trainer = Trainer(train_cfg, mesh, path)
        trainer.callbacks.extend(callbacks)
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, ParallelConfigError) as e:
        print(f"moetron: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
