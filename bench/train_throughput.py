"""Training throughput of model presets on this machine: tokens/s, TFLOP/s per GPU and MFU.

Each case runs `python -m moetron.train` for `--steps` steps on the built-in corpus and reports the
mean over the log intervals after the first (which holds start-up, tokenizer and warm-up). MFU uses
`moetron.model.counting.training_flops_per_token` (causal attention) and the peak table of
`moetron.trainer.metrics`. Results go to a JSON file with the command, git sha, device and versions.

    python bench/train_throughput.py --out bench/results/train_throughput.json --git-sha SHA \
        --case "moe_debug:" --case "deepseek_v3_mini:data.seq_len=2048 data.micro_batch_size=4"
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_case(preset: str, overrides: list[str], steps: int, log_every: int, work: Path) -> dict:
    run_dir = work / f"{preset}-{int(time.time())}"
    cmd = [
        sys.executable, "-m", "moetron.train", f"model={preset}", f"trainer.steps={steps}",
        f"logging.log_every={log_every}", "logging.wandb=false", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "trainer.save_final=false", "trainer.resume=none", f"trainer.run_dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    record = {"preset": preset, "overrides": overrides, "command": " ".join(cmd[1:]), "wall_s": time.time() - start}
    if proc.returncode != 0:
        record["error"] = proc.stderr[-2000:]
        return record
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("loss") is not None][1:]  # drop the warm-up interval
    for key in ("tokens_per_sec", "tokens_per_sec_per_gpu", "tflops_per_gpu", "mfu"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        record[key] = statistics.mean(values) if values else None
    record["mem_peak_gb"] = max(r["mem_peak_gb"] for r in rows)
    record["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]]
    record["intervals_measured"] = len(rows)
    shutil.rmtree(run_dir, ignore_errors=True)  # (a large model's run leaves gigabytes: the next case needs the disk)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", required=True, help="PRESET:override override ...")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default="unknown")
    parser.add_argument("--work", default="/tmp/moetron-bench")
    args = parser.parse_args()

    results = []
    for case in args.case:
        preset, _, rest = case.partition(":")
        record = run_case(preset, rest.split(), args.steps, args.log_every, Path(args.work))
        print(json.dumps(record), flush=True)
        results.append(record)
    import triton  # noqa: F401  (version only)

    out = {
        "benchmark": "train_throughput",
        "command": " ".join(sys.argv),
        "git_sha": args.git_sha,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "triton": sys.modules["triton"].__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
