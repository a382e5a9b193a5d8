"""bench/fp8_convergence.py's records: the per-step Recorder (a trainer callback), the output JSON (Report), the
comparison of two runs (final losses, held-out loss, step 1, throughput) against the 1% target, and the summary
printed at the end.

Runs of one comparison recorded in separate files (`--only NAME` runs, or a pair whose second run failed and was
re-run alone) are compared by `merge`: their settings must be the same (common_overrides), and the merged JSON names
each run's file, command and sha.

    python bench/convergence_results.py merge --out bench/results/X.json A.json B.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

TARGET_REL_DIFF = 0.01
FINAL_WINDOW = 10  # final loss = mean over this many last steps
SPIKE_FROM = 10  # gradient norms from this step on are past the first steps' transient (max_grad_norm_after_step_10)
CURVE_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "grad_norm_embed", "step_s", "tokens_per_sec")


class Recorder:
    """Step callback: per-step losses, gradient norm and wall time; progress lines; deadline."""

    def __init__(self, name: str, steps: int, deadline: float | None, on_progress, eval_every: int = 0):
        self.name, self.steps, self.deadline, self.on_progress = name, steps, deadline, on_progress
        self.eval_every = eval_every
        self.curve: dict[str, list] = {key: [] for key in ("step", *CURVE_KEYS)}
        self.evals: dict[str, list] = {"step": [], "loss": []}  # held-out loss, every eval_every steps and last
        self.start = time.perf_counter()
        self.first_step_at_s: float | None = None
        self.prev: float | None = None
        self.skipped_steps = 0
        # The largest max_memory_allocated read after any step (the trainer's metrics reset that peak every log
        # interval, so one reading holds only the last interval's), and the largest memory_reserved: the caching
        # allocator's footprint, which another process on the GPU cannot use.
        self.peak_mem_gb: float | None = None
        self.peak_reserved_gb: float | None = None
        self.stopped_early = False

    def __call__(self, trainer, step: int, result) -> None:
        now = time.perf_counter()
        step_s = now - self.prev if self.prev is not None else None  # step 1 also holds warm-up and tuning
        self.prev = now
        if self.first_step_at_s is None:
            self.first_step_at_s = now - self.start
        losses = result.losses
        row = {
            "step": step, "loss": losses.get("loss"), "lm_loss": losses.get("lm_loss"),
            "mtp_loss": losses.get("mtp_loss"), "balance_loss": losses.get("balance_loss"),
            "grad_norm": _finite(result.grad_norm), "grad_norm_embed": _finite(result.grad_norm_embed),
            "step_s": step_s,
            "tokens_per_sec": result.tokens / step_s if step_s else None,
        }  # fmt: skip
        for key, value in row.items():
            self.curve[key].append(step if key == "step" else _finite(value))
        self.skipped_steps += int(result.skipped)
        if torch.cuda.is_available() and trainer.device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(trainer.device) / 2**30
            reserved = torch.cuda.memory_reserved(trainer.device) / 2**30
            self.peak_mem_gb = max(self.peak_mem_gb or 0.0, allocated)
            self.peak_reserved_gb = max(self.peak_reserved_gb or 0.0, reserved)
        if step % 25 == 0 or step == self.steps or step == 1:
            done = now - self.start
            rate = _median(self.curve["step_s"][1:])
            eta = f", ETA {rate * (self.steps - step):.0f} s" if rate else ""
            print(
                f"[{self.name}] step {step}/{self.steps} loss {_finite(row['loss']) or float('nan'):.4f} "
                f"({done:.0f} s{eta}{', ' + format(rate, '.3f') + ' s/step' if rate else ''})",
                flush=True,
            )
            self.on_progress()
        if step < self.steps and self.deadline is not None and time.time() > self.deadline:
            self.stopped_early = True
            print(f"[{self.name}] --budget-s reached: stopping at step {step}", flush=True)
            trainer.request_stop()
        last = step == self.steps or self.stopped_early
        if self.eval_every and (step == 1 or step % self.eval_every == 0 or last):
            loss = trainer.evaluate().get("eval/loss")
            if loss is not None:
                self.evals["step"].append(step)
                self.evals["loss"].append(_finite(loss))
                print(f"[{self.name}] step {step} held-out loss {loss:.4f}", flush=True)
            self.prev = time.perf_counter()  # (the time spent evaluating is not the next step's)

    def summary(self) -> dict:
        skip = 5 if len(self.curve["step"]) > 10 else 1  # past warm-up and autotuning
        step_s = [s for s in self.curve["step_s"][skip:] if s]
        tps = [t for t in self.curve["tokens_per_sec"][skip:] if t]
        return {
            "steps_done": len(self.curve["step"]),
            "stopped_early": self.stopped_early,
            "skipped_steps": self.skipped_steps,
            "wall_s": round(time.perf_counter() - self.start, 1),
            "first_step_at_s": None if self.first_step_at_s is None else round(self.first_step_at_s, 1),
            "step_s_median": _median(step_s),
            "tokens_per_sec_median": _median(tps),
            "peak_mem_gb": None if self.peak_mem_gb is None else round(self.peak_mem_gb, 2),
            "peak_reserved_gb": None if self.peak_reserved_gb is None else round(self.peak_reserved_gb, 2),
            # a loss spike after the first steps' transient (seen in BF16 at seed 1 and in the held-out run)
            "max_grad_norm_after_step_10": _max(self.curve["grad_norm"][SPIKE_FROM:]),
            "curve": self.curve,
            "eval": self.evals,
        }


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Report:
    """The output JSON, rewritten on every progress line of a run in flight and after each run."""

    def __init__(self, path: str, out: dict):
        self.path, self.out = Path(path), out
        self.live: dict[str, Recorder] = {}  # runs in flight
        self.t0 = time.perf_counter()

    def save(self) -> None:
        for name, recorder in self.live.items():
            self.out["runs"].setdefault(name, {}).update(recorder.summary())
        self.out["total_wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # (written whole, then renamed: a reader sees no part)
        tmp.write_text(json.dumps(self.out, indent=1) + "\n")
        os.replace(tmp, self.path)


def compare(bf16: dict, fp8: dict, second: str = "fp8", concurrent: bool = False) -> dict:
    """Final losses over the last FINAL_WINDOW steps both runs completed, their relative difference,
    the step-1 difference (same weights, same batch) and the throughput ratio (not for `concurrent` runs, which
    shared the GPU). `second` names the run compared with BF16 in the keys (fp8, or bf16_b for the noise floor)."""
    n = min(len(bf16["curve"]["loss"]), len(fp8["curve"]["loss"]))
    out: dict = {"steps_compared": n, "target_rel_diff": TARGET_REL_DIFF, "final_window": FINAL_WINDOW}
    if n == 0:
        out["passed"] = False
        return out
    lo = max(0, n - FINAL_WINDOW)
    for key in ("loss", "lm_loss"):
        a = [v for v in bf16["curve"][key][lo:n] if v is not None]
        b = [v for v in fp8["curve"][key][lo:n] if v is not None]
        if not a or not b:
            continue
        fa, fb = statistics.mean(a), statistics.mean(b)
        suffix = "" if key == "loss" else f"_{key}"
        out[f"final_loss_bf16{suffix}"] = fa
        out[f"final_loss_{second}{suffix}"] = fb
        out[f"rel_diff{suffix}"] = (fb - fa) / abs(fa)  # > 0: FP8 above BF16
    s1a, s1b = bf16["curve"]["loss"][0], fp8["curve"]["loss"][0]
    if s1a is not None and s1b is not None:
        out["step1_loss_bf16"], out[f"step1_loss_{second}"] = s1a, s1b
        out["step1_rel_diff"] = (s1b - s1a) / abs(s1a)
    pairs = [(x, y) for x, y in zip(bf16["curve"]["loss"][:n], fp8["curve"]["loss"][:n]) if x and y]
    if pairs:
        out["max_abs_rel_diff_per_step"] = max(abs(y - x) / abs(x) for x, y in pairs)
    # the held-out loss at the last step both runs evaluated: the same batches for both, none of them trained on
    eval_a, eval_b = bf16.get("eval", {}), fp8.get("eval", {})
    common = sorted(set(eval_a.get("step", [])) & set(eval_b.get("step", [])))
    if common:
        at = common[-1]
        ea = eval_a["loss"][eval_a["step"].index(at)]
        eb = eval_b["loss"][eval_b["step"].index(at)]
        if ea is not None and eb is not None:
            out["eval_step"], out["eval_loss_bf16"], out[f"eval_loss_{second}"] = at, ea, eb
            out["eval_rel_diff"] = (eb - ea) / abs(ea)  # > 0: the second run above BF16
    for name, run in (("bf16", bf16), (second, fp8)):  # (a run that diverged early makes the comparison a draw)
        out[f"max_grad_norm_after_step_10_{name}"] = run.get("max_grad_norm_after_step_10")
    if bf16.get("tokens_per_sec_median") and fp8.get("tokens_per_sec_median") and not concurrent:
        out[f"{second}_over_bf16_tokens_per_sec"] = fp8["tokens_per_sec_median"] / bf16["tokens_per_sec_median"]
    # passed: judged on the compared steps; all_steps_compared says whether those were all --steps
    out["all_steps_compared"] = n == bf16["steps_done"] == fp8["steps_done"] and not (
        bf16.get("error") or fp8.get("error") or bf16.get("stopped_early") or fp8.get("stopped_early")
    )
    if second == "fp8":  # (the noise floor has no target of its own)
        out["passed"] = bool("rel_diff" in out and abs(out["rel_diff"]) < TARGET_REL_DIFF)
    return out


def print_summary(out: dict, second: str) -> None:
    """The runs' table and the comparison's lines, from the output JSON's dict."""
    print(
        f"\n{'run':6} {'steps':>5} {'wall s':>7} {'s/step':>7} {'tokens/s':>9} {'final loss':>10} {'held-out':>8} "
        f"{'peak GiB':>8} {'max |g| after 10':>16}"
    )
    for name, r in out["runs"].items():
        c = r["curve"]["loss"]
        last = [v for v in c[-FINAL_WINDOW:] if v is not None]
        final = statistics.mean(last) if last else float("nan")
        held_out = (r.get("eval", {}).get("loss") or [None])[-1]
        print(
            f"{name:6} {r['steps_done']:>5} {r['wall_s']:>7.0f} {r['step_s_median'] or float('nan'):>7.3f} "
            f"{r['tokens_per_sec_median'] or float('nan'):>9.0f} {final:>10.4f} {held_out or float('nan'):>8.4f} "
            f"{r['peak_mem_gb'] or float('nan'):>8} {r.get('max_grad_norm_after_step_10') or float('nan'):>16.2f}"
        )
    comparison = out.get("comparison")
    if comparison:
        if "rel_diff" in comparison:
            print(
                f"final loss (mean of last {FINAL_WINDOW} of {comparison['steps_compared']} steps): "
                f"bf16 {comparison['final_loss_bf16']:.4f}, {second} {comparison[f'final_loss_{second}']:.4f}, "
                f"relative difference {comparison['rel_diff']:+.3%} "
                + (
                    f"(target < {TARGET_REL_DIFF:.0%}): {'PASS' if comparison['passed'] else 'FAIL'}"
                    if second == "fp8"
                    else "(the noise floor)"
                )
                + ("" if comparison["all_steps_compared"] else " (on the steps both runs completed only)")
            )
        if "eval_rel_diff" in comparison:
            print(
                f"held-out loss after step {comparison['eval_step']}: bf16 {comparison['eval_loss_bf16']:.4f}, "
                f"{second} {comparison[f'eval_loss_{second}']:.4f}, relative difference {comparison['eval_rel_diff']:+.3%}"
            )
        if "step1_rel_diff" in comparison:
            print(f"step-1 loss relative difference {comparison['step1_rel_diff']:+.4%} (same weights and batch)")


def merge(paths: list[str], out_path: str | None = None) -> dict:
    """One comparison from the completed runs of several result files of the same settings (the first file's
    fields, `merged_from` with each file's command, sha and device, the runs, and their comparison). The runs are
    treated as concurrent (no throughput ratio): they ran in different processes, possibly beside others."""
    docs = [json.loads(Path(path).read_text()) for path in paths]
    base = docs[0]
    runs, sources = {}, []
    for path, doc in zip(paths, docs):
        if doc["common_overrides"] != base["common_overrides"]:
            diff = sorted(set(doc["common_overrides"]) ^ set(base["common_overrides"]))
            raise ValueError(f"{path}: other settings than {paths[0]} ({diff}); only runs of one setting compare")
        sources.append({key: doc.get(key) for key in ("command", "git_sha", "device", "torch", "triton", "date")})
        sources[-1]["file"] = Path(path).name
        for name, run in doc["runs"].items():
            if run.get("error") or run.get("stopped_early") or not run.get("steps_done"):
                continue  # (a failed or cut run of a file stands in for none)
            if name in runs:
                raise ValueError(f"{path}: run {name!r} is complete in two of the files; give one of them")
            runs[name] = {**run, "from_file": Path(path).name}
            if name == "bf16_b":
                base = {**base, "second_run": doc.get("second_run"), "fp8_override": None}
    second = "fp8" if "fp8" in runs else "bf16_b"
    if set(runs) != {"bf16", second}:
        raise ValueError(f"the files hold the complete runs {sorted(runs)}; a comparison needs bf16 and one of fp8, "
                         "bf16_b")  # fmt: skip
    out = {key: value for key, value in base.items() if key not in ("runs", "comparison", "command", "concurrent")}
    out.update(merged_from=sources, runs=runs, complete=True, concurrent=True)
    out["git_sha"] = ",".join(sorted({source["git_sha"] for source in sources if source["git_sha"]}))
    out["comparison"] = compare(runs["bf16"], runs[second], second, concurrent=True)
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["merge"])
    parser.add_argument("files", nargs="+", help="result files of bench/fp8_convergence.py")
    parser.add_argument("--out", required=True, help="the merged comparison's JSON")
    args = parser.parse_args()
    out = merge(args.files, args.out)
    print_summary(out, "fp8" if "fp8" in out["runs"] else "bf16_b")


if __name__ == "__main__":
    sys.exit(main())
