"""FP8 vs BF16 convergence: the same model, seed and data trained twice, once with bf16 GEMMs
(`model.fp8.enabled=false`) and once with block-scaled FP8 GEMMs (`model.fp8.enabled=true`), in one
process through `moetron.train.run`; the loss curves side by side.

Target (issue 5): the final loss of the FP8 run within 1% of the BF16 run, final loss = mean of the
last 10 steps both runs completed (the same steps, hence the same learning rates and batches).
Step 1 sees identical weights and data, so its two losses differ only by FP8 rounding; a large
step-1 difference means the two runs did not start from the same model.

The held-out loss (`--eval-every`, by default after step 1, every 50 steps and after the last; `--eval-batches`
micro-batches of the corpus's validation split, the same batches for both runs and never trained on) is the second
measure: it averages over more tokens than a step's batch and does not reward memorizing the ~8 epochs of training
text, so it moves less from run to run than the last steps' training loss. `comparison.eval_rel_diff` is the
relative difference at the last step both runs evaluated. `--val-fraction` (default 0.15) sets the held-out share
of the built-in corpus's documents: at the config's 0.05 the GPU machine's validation split held 3 windows of 2049
tokens, fewer than one evaluation batch of 4. The step-1 evaluation makes a too-small split fail within a minute.

The BF16 run goes first, so a failing FP8 run still leaves a baseline. The JSON is rewritten every 25
steps and after each run (`"complete": false` until both finished), so a run cut off by a time
limit keeps what it measured. `--budget-s` stops the runs early instead (the BF16 run by half the
budget, the FP8 run by all of it); the comparison then uses the steps both completed and says so
(`comparison.all_steps_compared: false`).

`--concurrent` trains the two runs at once, each in a child process of this script (`--only NAME`, its own JSON
under `--work`), and compares them when both have ended. On a GPU the second starts after the first's first step,
and only if the memory then free holds another run of the first's footprint; otherwise after the first has ended
(`"concurrent": false` in the JSON). The numerics are those of the sequential runs (each run
is its own process with its own seeds; nothing is shared), and the wall time is about that of the slower run when
the steps are bound by the host, as the mini preset's are (the GPU was busy 146-155 ms of FP8's 391-414 ms steps,
bench/results/fp8_step.json). Both runs must fit in the GPU's memory together, and for deepseek_v3_mini they do
not on an H100 (80 GB): the BF16 process held 44-45 GiB (the caching allocator's reserve, the CUDA context, kernel
workspaces) and the FP8 process ran out of memory at its first optimizer step with 34 GiB allocated, with and without
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (bench/results/fp8_convergence_code_seed1.json). That is why the
second child now waits for the first's footprint (the check has not run on a GPU yet); two `--only` runs compared by
`bench/convergence_results.py merge` do the same by hand. (The
30.2 GiB "peak" of earlier JSONs was the last log interval's: the trainer resets the allocator's peak every interval.
The Recorder now keeps the largest reading and the largest reserved memory, `peak_reserved_gb`.) Tokens/s of
concurrent runs are those of two runs sharing a GPU (`"concurrent": true` in the JSON; no throughput ratio).

No checkpoints (`trainer.save_final=false`: a 2.5B-parameter checkpoint with its optimizer is ~40 GB),
no evaluation, no wandb.

Cost of the defaults (deepseek_v3_mini, 300 steps of 4 x 2048 tokens, full activation checkpointing):
bench/results/train_throughput*.json measured ~19k tokens/s for this setting on one H100, 0.43 s a
step, so ~130 s of BF16 steps plus start-up (kernel autotuning on the first step); the FP8 run adds
the tuning of its GEMMs. The built-in corpus holds ~0.33M training tokens, so 2.5M tokens are ~7.5
epochs: a numerics comparison, not a language-modelling result.

    python bench/fp8_convergence.py --out bench/results/fp8_convergence.json --git-sha SHA
    python bench/fp8_convergence.py --steps 3 --device cpu --seq-len 64 --micro-batch 2 --out /tmp/c.json \\
        --model moe_debug --override model.q_lora_rank=128 model.kv_lora_rank=128 model.moe_ffn_hidden=128
    python bench/plot_fp8_convergence.py bench/results/fp8_convergence.json   # -> fp8_convergence.png

The noise floor the 1% target is judged against: `--second bf16 --second-override kernels.backend=sdpa`
trains BF16 twice, the second run with other kernels for the same math (torch's SDPA attention in
bf16 instead of moetron's), so the two differ by rounding only; their final-loss difference is how far rounding alone
moves this comparison (the JSON names the second run "bf16_b").

    python bench/fp8_convergence.py --out bench/results/fp8_convergence_floor.json --second bf16 \
        --second-override kernels.backend=sdpa

`--data-path DIR` trains both runs on a prepared directory instead of the built-in corpus; the standard library's
source (`python bench/code_corpus.py --out DIR`: ~3-9M training tokens, by Python version) is read less than once by
300 steps, so the comparison is not one of memorizing a small corpus (see bench/code_corpus.py):

    python bench/code_corpus.py --out /tmp/code
    python bench/fp8_convergence.py --warmup-steps 100 --data-path /tmp/code --out bench/results/fp8_convergence_code.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from convergence_results import Recorder, Report, compare, print_summary  # (bench/, on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import moetron.train  # noqa: F401  (registers the TrainConfig schema with Hydra)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def common_overrides(args) -> list[str]:
    return [
        f"model={args.model}",
        f"data.seq_len={args.seq_len}",
        f"data.micro_batch_size={args.micro_batch}",
        f"trainer.steps={args.steps}",
        f"optim.warmup_steps={args.warmup_steps if args.warmup_steps is not None else min(20, args.steps // 10)}",
        f"trainer.seed={args.seed}",
        f"trainer.device={args.device}",
        f"trainer.activation_checkpointing={args.activation_checkpointing}",
        "trainer.eval_every=0",  # (the Recorder evaluates, every --eval-every steps and after the last)
        f"trainer.eval_batches={args.eval_batches}",
        f"data.val_fraction={args.val_fraction}",
        *(["data.source=bin", f"data.path={args.data_path}"] if args.data_path else []),
        "trainer.checkpoint_every=0",
        "trainer.save_final=false",
        "trainer.resume=none",
        "logging=quiet",
        "logging.console=false",
        "logging.log_every=10",
        *args.override,
    ]


def train_one(
    name: str, overrides: list[str], run_dir: Path, steps: int, deadline, report: Report, eval_every: int = 0
) -> dict:
    from moetron.train import run

    cfg = compose(overrides)
    recorder = Recorder(name, steps, deadline, report.save, eval_every)
    report.live[name] = recorder
    print(f"[{name}] overrides: {' '.join(overrides)}", flush=True)
    record = {"overrides": overrides, "run_dir": str(run_dir)}
    try:
        run(cfg, run_dir=str(run_dir), callbacks=[recorder])
    except Exception:  # keep the other run's results; the error goes into the JSON
        record["error"] = traceback.format_exc()[-3000:]
        print(f"[{name}] FAILED:\n{record['error']}", file=sys.stderr, flush=True)
    finally:
        report.live.pop(name)
    record.update(recorder.summary())
    report.out["runs"][name] = record
    report.save()
    print(
        f"[{name}] {record['steps_done']} steps in {record['wall_s']} s (first step done at "
        f"{record['first_step_at_s']} s; median {record['step_s_median']} s/step, "
        f"{record['tokens_per_sec_median']} tokens/s)",
        flush=True,
    )
    return record


def run_children(names: list[str], out_path: str, work: Path, report: Report) -> dict[str, dict]:
    """--concurrent: this script once per run in `names` (`--only NAME`, the same other arguments, the child's JSON
    and run directory under `work`); returns their `runs` entries. On a GPU the second child starts once the first
    has done its first step (the step that holds the most memory: optimizer state, kernel tuning) and only if the
    memory left free holds another run of that footprint (`second_fits`); otherwise after the first has ended, and
    `report.out["concurrent"]` becomes false. A child that ends without its JSON, or killed, is recorded with its
    exit status as the run's error."""
    argv, skip = [], False
    for arg in sys.argv[1:]:  # this command line without --concurrent and --out (the children get their own)
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif arg != "--concurrent" and not arg.startswith("--out="):
            argv.append(arg)
    work.mkdir(parents=True, exist_ok=True)

    def start(name: str):
        child_out = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name, "--out", str(child_out)]
        cmd += ["--work", str(work / name)]  # (argparse keeps the last --work)
        print(f"[{name}] child process: {' '.join(cmd)}", flush=True)
        return subprocess.Popen(cmd), child_out

    children = {names[0]: start(names[0])}
    for name in names[1:]:
        if torch.cuda.is_available() and not wait_and_check_room(*children[names[0]], names[0]):
            print(
                f"[{name}] not enough GPU memory beside [{names[0]}]: it starts when [{names[0]}] has ended", flush=True
            )
            children[names[0]][0].wait()
            report.out["concurrent"] = False
        children[name] = start(name)
    runs = {}
    for name, (proc, child_out) in children.items():
        code = proc.wait()
        run = json.loads(child_out.read_text())["runs"].get(name) if child_out.is_file() else None
        if run is None:  # (an empty record, as a run that never reached its first step leaves)
            run = {**Recorder(name, 0, None, None).summary(), "stopped_early": True}
        if code != 0:
            run["error"] = run.get("error") or f"child process exited with status {code}"
        runs[name] = run
        report.out["runs"][name] = run
        report.save()
    return runs


def second_fits(first_reserved_gib: float, free_gib: float, margin_gib: float = 4.0) -> bool:
    """Whether a second run like the first (its caching allocator's footprint after its first step) fits in the
    GPU memory left free, with `margin_gib` for its CUDA context and what the allocator reserves beyond the first
    step. (On an H100 the mini preset's BF16 run held 44-45 GiB and the FP8 run, started beside it, ran out.)"""
    return free_gib >= first_reserved_gib + margin_gib


def wait_and_check_room(proc, child_out: Path, name: str, poll_s: float = 2.0) -> bool:
    """Wait until the child `proc` has recorded its first step (or ended), then whether a second run fits beside it."""
    reserved = None
    while proc.poll() is None:
        try:
            run = json.loads(child_out.read_text())["runs"].get(name, {}) if child_out.is_file() else {}
        except (ValueError, KeyError):  # (a file being rewritten)
            run = {}
        if run.get("steps_done"):
            reserved = run.get("peak_reserved_gb")
            break
        time.sleep(poll_s)
    if proc.poll() is not None or reserved is None:
        return proc.poll() is not None  # (ended: all its memory is free; no reading: wait for it)
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    fits = second_fits(reserved, free_gib)
    print(f"[{name}] holds {reserved:.1f} GiB after its first step; {free_gib:.1f} GiB free", flush=True)
    return fits


def data_summary(path: str, train_tokens: int) -> dict:
    """--data-path's prepared directory: its token counts and sources, and how many times the runs read it."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    n_train = meta["n_tokens"]["train"]
    return {
        "path": path, "sources": meta["sources"], "tokenizer": meta["tokenizer"], "n_tokens": meta["n_tokens"],
        "epochs_read": round(train_tokens / n_train, 3) if n_train else None,
    }  # fmt: skip


def git_sha() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results (bench/results/fp8_convergence.json)")
    parser.add_argument("--git-sha", default=None, help="default: git rev-parse HEAD, if this is a checkout")
    parser.add_argument("--model", default="deepseek_v3_mini", help="model preset")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step (tokens = this * seq-len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: min(20, steps // 10)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--activation-checkpointing", default="full", help="none | selective | full")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for both runs")
    parser.add_argument(
        "--eval-every", type=int, default=50, help="held-out loss every this many steps and after the last (0: never)"
    )
    parser.add_argument("--eval-batches", type=int, default=8, help="micro-batches of held-out data per evaluation")
    parser.add_argument(
        "--val-fraction", type=float, default=0.15,
        help="share of the built-in corpus's documents held out (data.val_fraction; its 0.05 default held 3 windows "
        "of 2049 tokens on the GPU machine, fewer than one 4-sequence evaluation batch)",
    )  # fmt: skip
    parser.add_argument(
        "--data-path", default=None,
        help="train on this prepared directory (data.source=bin) instead of the built-in corpus, e.g. the standard "
        "library's source from bench/code_corpus.py, which 300 steps read less than once",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None, help="stop early to finish within this wall time")
    parser.add_argument(
        "--only", choices=["bf16", "fp8", "bf16_b"], default=None,
        help="run one of the two (debugging; --concurrent's child processes)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrent", action="store_true",
        help="train the two runs at once in two child processes (both must fit in GPU memory; see above)",
    )  # fmt: skip
    parser.add_argument(
        "--second", choices=["fp8", "bf16"], default="fp8",
        help="the run compared with BF16: fp8 (the target), or bf16 again (the noise floor; see above)",
    )  # fmt: skip
    parser.add_argument("--second-override", nargs="*", default=[], help="Hydra overrides of the second run only")
    parser.add_argument("--work", default="/tmp/moetron-fp8-convergence", help="run directories (metrics.jsonl)")
    args = parser.parse_args()

    started, t0 = time.time(), time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(args.work) / stamp
    common = common_overrides(args)
    import triton

    out = {
        "benchmark": "fp8_convergence", "command": " ".join(sys.argv), "git_sha": args.git_sha or git_sha(),
        "device": device_name(args.device), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "steps": args.steps,
        "tokens_per_step": args.seq_len * args.micro_batch, "common_overrides": common,
        "fp8_override": "model.fp8.enabled=true", "complete": False, "runs": {},
    }  # fmt: skip

    if args.data_path:
        out["data"] = data_summary(args.data_path, args.steps * args.seq_len * args.micro_batch)
    report = Report(args.out, out)
    second = "fp8" if args.second == "fp8" else "bf16_b"
    if second != "fp8":
        out["fp8_override"] = None
        out["second_run"] = {"name": second, "overrides": args.second_override}
    pair = ["bf16", second]
    if args.only and args.only not in pair:
        parser.error(f"--only {args.only}: this comparison's runs are {pair}")
    names = [args.only] if args.only else pair
    children = args.concurrent and not args.only
    if children:
        out["concurrent"] = True  # (false if the second child had to wait for the first: run_children)
        out["runs"] = run_children(names, args.out, work, report)
    for name in [] if children else names:
        deadline = None
        if args.budget_s:  # (sequential: the BF16 run gets the first half of the budget)
            deadline = started + args.budget_s * (0.5 if name == "bf16" and len(names) == 2 else 1.0)
        flag = "true" if name == "fp8" else "false"
        extra = args.second_override if name == pair[1] else []
        overrides = [*common, f"model.fp8.enabled={flag}", *extra, f"trainer.run_dir={work / name}"]
        train_one(name, overrides, work / name, args.steps, deadline, report, args.eval_every)
        gc.collect()  # the first model, optimizer and activations go before the second is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            print(f"[{name}] done; {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated", flush=True)

    if len(names) == 2:
        out["comparison"] = compare(out["runs"]["bf16"], out["runs"][second], second, bool(out.get("concurrent")))
    out["complete"] = all(not r.get("error") and not r["stopped_early"] for r in out["runs"].values())
    report.save()

    print_summary(out, second)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {args.out}")
    if any(r.get("error") for r in out["runs"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
