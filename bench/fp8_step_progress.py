"""How much of a training step's progress FP8's arithmetic costs, measured at points of a BF16 run: a per-step
attribution that does not depend on two runs' trajectories (which diverge: bench/fp8_convergence.py compares
whole curves and inherits that noise).

A BF16 run trains as `./run train` would (moetron.train.run, the same overrides as bench/fp8_convergence.py). After
each step listed in `--at`, with the weights and AdamW state of that moment:

* G: the mean BF16 gradient over `--full-batches` micro-batches (a stand-in for the full-batch gradient);
* for `--batches` further micro-batches, the BF16 gradient g and the gradient f of an FP8 model holding the same
  weights (`model.fp8.enabled=true`, every FP8 option as configured);
* with P = 1 / (sqrt(v_hat) + eps), Adam's preconditioner from the optimizer's second moment,
    progress = sum G.P(f - g) / sum G.P g   first-order progress along G gained (> 0) or lost (< 0) to FP8,
    noise    = sum |P(f - g)|^2 / sum |P(g - G)|^2   FP8's error power against the minibatch sampling noise,
    rel      = sqrt(sum |f - g|^2 / sum |g|^2)   the raw relative gradient error,
  each summed over parameters and batches, one parameter at a time (no flattened copy of the model).

The run itself is not perturbed: the measurement's batches come from the data stream, which is then rewound, the
routers' load counters it adds are reset, and gradients are cleared as a step leaves them. (A CPU test checks that
the losses with and without `--at` are equal.) A CPU proxy study (docs/fp8_performance.md) measured at most ~1%
progress lost per step; a 5% final-loss gap after 300 steps needs far more, or the runs' divergence.

Memory: the FP8 model's weights and gradients and G (in bf16) come on top of the run: ~25 GB more for
deepseek_v3_mini (2.5B parameters in fp32). The run itself held 34 GiB allocated at its first optimizer step and
44-45 GiB reserved by the caching allocator on an H100 (bench/fp8_convergence.py's docstring), so ~70 GB in all: an
H100 should hold it, with little to spare; not yet run on a GPU.

    python bench/fp8_step_progress.py --out bench/results/fp8_step_progress.json --at 100 200 300 --git-sha SHA
    python bench/fp8_step_progress.py --out bench/results/fp8_step_progress_code.json --at 100 200 300 --data-path /tmp/code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


class Attribution:
    """Step callback: at the steps in `at`, the FP8 model's gradient against BF16's (module docstring)."""

    def __init__(self, at: list[int], full_batches: int, batches: int, report):
        self.at, self.full_batches, self.batches, self.report = set(at), full_batches, batches, report
        self.fp8_model = None
        self.results: list[dict] = []

    def __call__(self, trainer, step: int, result) -> None:
        if step not in self.at:
            return
        t0 = time.perf_counter()
        data_state = trainer.data.state_dict()
        fp8 = self._fp8_model(trainer)
        fp8.load_state_dict(trainer.plain.state_dict())
        params = dict(trainer.plain.named_parameters())
        fp8_params = dict(fp8.named_parameters())
        precond = self._preconditioner(trainer)
        draw = [trainer.data.next_train_batch(trainer.device) for _ in range(self.full_batches + self.batches)]
        full = {}  # name -> G in bf16
        trainer.plain.zero_grad(set_to_none=True)
        for batch in draw[: self.full_batches]:
            self._backward(trainer, trainer.plain, batch, 1.0 / self.full_batches)
        for name, p in params.items():
            full[name] = torch.zeros_like(p, dtype=torch.bfloat16) if p.grad is None else p.grad.to(torch.bfloat16)
        # the six sums (module docstring), kept on the device: one host sync per measurement, not six per parameter
        sums = torch.zeros(6, dtype=torch.float64, device=trainer.device)
        losses = {"bf16": [], "fp8": []}
        for batch in draw[self.full_batches :]:
            trainer.plain.zero_grad(set_to_none=True)
            fp8.zero_grad(set_to_none=True)
            losses["bf16"].append(self._backward(trainer, trainer.plain, batch, 1.0))
            losses["fp8"].append(self._backward(trainer, fp8, batch, 1.0))
            for name, p in params.items():
                if (
                    p.grad is None
                    or fp8_params[name].grad is None
                    or "exp_avg_sq" not in trainer.optimizer.state.get(p, {})
                ):
                    continue  # (a parameter without a gradient here, or never updated yet)
                g, f, big_g, pre = p.grad.float(), fp8_params[name].grad.float(), full[name].float(), precond(p)
                d = f - g
                pd, f64 = pre * d, torch.float64  # (each sum made and its temporary freed in turn: large parameters)
                sums += torch.stack([
                    (big_g * pd).sum(dtype=f64), (big_g * pre * g).sum(dtype=f64), pd.square().sum(dtype=f64),
                    (pre * (g - big_g)).square().sum(dtype=f64), d.square().sum(dtype=f64), g.square().sum(dtype=f64),
                ])  # fmt: skip
        # leave the run as a step leaves it: the stream rewound, no gradients, no extra router loads
        trainer.data.load_state_dict(data_state)
        trainer.optimizer.zero_grad(set_to_none=True)
        fp8.zero_grad(set_to_none=True)
        trainer.plain.reset_router_stats()
        progress_num, progress_den, noise_num, noise_den, rel_num, rel_den = sums.tolist()
        record = {
            "step": step,
            "progress": progress_num / progress_den,
            "noise": noise_num / noise_den if noise_den else None,
            "rel": (rel_num / rel_den) ** 0.5,
            "loss_bf16": sum(losses["bf16"]) / len(losses["bf16"]),
            "loss_fp8": sum(losses["fp8"]) / len(losses["fp8"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        self.results.append(record)
        print(f"[progress] {json.dumps(record)}", flush=True)
        self.report(self.results)

    def _fp8_model(self, trainer):
        """The FP8 twin of the run's model (same config with model.fp8.enabled, the same activation checkpointing),
        built once on the run's device; its weights are loaded from the run at each measurement."""
        if self.fp8_model is None:
            import dataclasses

            from moetron.model import Transformer
            from moetron.parallel.apply import apply_activation_checkpointing

            cfg = trainer.plain.cfg
            fp8_cfg = dataclasses.replace(cfg, fp8=dataclasses.replace(cfg.fp8, enabled=True))
            with torch.device(trainer.device):
                model = Transformer(fp8_cfg)
            apply_activation_checkpointing(model, trainer.cfg.trainer.activation_checkpointing)
            self.fp8_model = model.train()
        return self.fp8_model

    @staticmethod
    def _preconditioner(trainer):
        """p -> 1 / (sqrt(v_hat) + eps) from AdamW's state for p (bias-corrected second moment), made when asked (a
        stored copy for every parameter would cost as much memory as the weights)."""
        hyper = {id(p): (g["betas"][1], g["eps"]) for g in trainer.optimizer.param_groups for p in g["params"]}

        def precond(p):
            beta2, eps = hyper[id(p)]
            state = trainer.optimizer.state[p]
            v_hat = state["exp_avg_sq"].float() / (1.0 - beta2 ** float(state["step"]))
            return 1.0 / (v_hat.sqrt() + eps)

        return precond

    @staticmethod
    def _backward(trainer, model, batch, weight: float) -> float:
        """loss.backward() of one micro-batch (gradients accumulate, scaled by `weight`); returns the loss."""
        with trainer.autocast():
            out = model(batch["input_ids"], labels=batch["labels"], documents=batch["documents"], check_ids=False)
        (out.loss * weight).backward()
        return out.loss.item()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fp8_convergence import common_overrides, compose, device_name, git_sha

    from moetron.train import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--git-sha", default=None)
    parser.add_argument("--at", type=int, nargs="+", required=True, help="measure after these steps")
    parser.add_argument("--full-batches", type=int, default=16, help="micro-batches for G")
    parser.add_argument("--batches", type=int, default=8, help="micro-batches compared, BF16 against FP8")
    parser.add_argument("--model", default="deepseek_v3_mini")
    parser.add_argument("--steps", type=int, default=None, help="default: the largest --at")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--activation-checkpointing", default="full")
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--data-path", default=None, help="a prepared directory (bench/code_corpus.py) to train on")
    parser.add_argument("--work", default="/tmp/moetron-fp8-step-progress")
    args = parser.parse_args()
    args.steps = args.steps or max(args.at)
    args.eval_batches, args.val_fraction = 0, 0.15  # (what common_overrides reads; no evaluation here)
    import triton

    out = {
        "benchmark": "fp8_step_progress", "command": " ".join(sys.argv), "git_sha": args.git_sha or git_sha(),
        "device": device_name(args.device), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "at": args.at, "full_batches": args.full_batches,
        "batches": args.batches, "losses": [], "measurements": [],
    }  # fmt: skip
    path = Path(args.out)

    def save(results):
        out["measurements"] = results
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")

    attribution = Attribution(args.at, args.full_batches, args.batches, save)
    overrides = [*common_overrides(args), "model.fp8.enabled=false", f"trainer.run_dir={args.work}"]
    losses = out["losses"]
    run(
        compose(overrides), run_dir=args.work, callbacks=[lambda tr, s, r: losses.append(r.losses["loss"]), attribution]
    )
    save(attribution.results)
    for r in attribution.results:
        print(f"step {r['step']}: progress {r['progress']:+.3%}, noise {r['noise']:.3%}, rel {r['rel']:.4f}")


if __name__ == "__main__":
    main()
