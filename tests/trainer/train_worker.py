"""Runs one training job from Hydra overrides in this process; used by the tests as a subprocess.

    python tests/trainer/train_worker.py [--kill-at STEP] override [override ...]

--kill-at STEP: SIGKILL this process right after optimizer step STEP (a crash: no clean-up runs).
"""

import os
import signal
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from moetron.train import run

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def main(argv: list[str]) -> None:
    kill_at = None
    if argv[:1] == ["--kill-at"]:
        kill_at, argv = int(argv[1]), argv[2:]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=argv)
    run_dir = cfg.trainer.run_dir

    def kill(trainer, step, result):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run(cfg, run_dir=run_dir, callbacks=[kill] if kill_at is not None else [])


if __name__ == "__main__":
    main(sys.argv[1:])
