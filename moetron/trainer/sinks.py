"""Where training metrics go. Each sink has `log(step, metrics)` and `close()`:

* `ConsoleSink`: a tqdm bar on a terminal, plus a plain line every `print_every` logs (only the
  plain lines when stdout is not a terminal, e.g. a Slurm log file).
* `JsonlSink`: one JSON object per log to `run_dir/metrics.jsonl`, flushed line by line.
* `WandbSink`: a wandb run under `run_dir`, online when credentials exist, else offline.

`MetricsLogger` fans out to the sinks on rank 0 only; `build_sinks`/`build_logger` make them from
plain arguments.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlparse


class Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


# (key, label, format) of the plain console line, in this order; absent or None values are skipped.
_CONSOLE_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("lr", "lr", "{:.3e}"),
    ("grad_norm", "grad_norm", "{:.3f}"),
    ("tokens_per_sec", "tok/s", "{:,.0f}"),
    ("tflops_per_gpu", "TFLOP/s/gpu", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("mem_peak_gb", "mem", "{:.1f}GiB"),
    ("moe/max_over_mean_load", "moe max/mean", "{:.2f}"),
    ("eval/loss", "eval loss", "{:.4f}"),
    ("eval/perplexity", "eval ppl", "{:.2f}"),
)
_POSTFIX_KEYS = ("loss", "lr", "tokens_per_sec", "mfu")


def _format_fields(metrics: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    parts = []
    for key, label, fmt in _CONSOLE_FIELDS:
        value = metrics.get(key)
        if key in keys and value is not None:
            parts.append(f"{label} {fmt.format(float(value))}")
    return parts


class ConsoleSink:
    """Progress bar (terminal only) with loss, lr, tokens/s and MFU, and a plain line on the 1st
    log and every `print_every` logs after; `use_bar=None` means "if `stream` is a terminal"."""

    def __init__(
        self,
        total_steps: int,
        print_every: int = 10,
        start_step: int = 0,
        stream: TextIO | None = None,
        use_bar: bool | None = None,
    ):
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not (isinstance(print_every, int) and print_every >= 1):
            raise ValueError(f"print_every must be an int >= 1 (logs between plain lines), got {print_every!r}")
        self.total_steps, self.print_every = total_steps, print_every
        self.stream = stream if stream is not None else sys.stdout
        if use_bar is None:
            use_bar = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if use_bar:
            from tqdm import tqdm  # only needed for the bar

            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)
        self._n_logs = 0
        self._start = time.monotonic()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._n_logs += 1
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(" ".join(_format_fields(metrics, _POSTFIX_KEYS)))
        if (self._n_logs - 1) % self.print_every == 0:
            elapsed = time.monotonic() - self._start
            all_keys = [key for key, _, _ in _CONSOLE_FIELDS]
            line = " | ".join(
                [f"step {step}/{self.total_steps}", *_format_fields(metrics, all_keys), f"{elapsed:.0f}s"]
            )
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


JSONL_KEYS = (
    "step", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb", "mem_reserved_peak_gb",
)  # fmt: skip


def _plain(value: Any) -> Any:
    """0-d tensors and numpy scalars as Python numbers; anything else as it is."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (bool, int, float)) else value


def _json_safe(value: Any) -> Any:
    """Strict-JSON form of a scalar metric: NaN/inf become the strings "nan", "inf", "-inf"
    (`float()` reads them back)."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # str(nan) == "nan", str(-inf) == "-inf"
    return value


def _not_json(value: Any) -> Any:
    raise TypeError(f"metric value {value!r} ({type(value).__name__}) is not JSON; valid: numbers, strings, None")


class JsonlSink:
    """Appends one strict-JSON object per log: `step`, `time` (unix seconds), the `JSONL_KEYS`
    (null when not given) and every other metric as given. NaN/inf are written as the strings
    "nan"/"inf"/"-inf" so that a diverged loss stays distinguishable from a missing one (null).
    Each line is flushed to the OS as written: a crashed process loses at most that line. A resumed
    run appends, so a step may appear twice; readers keep the last."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = open(self.path, "a", buffering=1, encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"JsonlSink({str(self.path)!r}) is closed")
        record = {"step": step, "time": time.time(), **dict.fromkeys(JSONL_KEYS[1:]), **metrics}
        record["step"] = step  # the argument wins over a "step" inside metrics
        record = {key: _json_safe(value) for key, value in record.items()}
        self._file.write(json.dumps(record, allow_nan=False, default=_not_json) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


WANDB_MODES = ("online", "offline", "disabled")


def _wandb_netrc_login(environ: Mapping[str, str]) -> bool:
    """Whether ~/.netrc (or $NETRC) holds a `wandb login` key for the W&B host."""
    hosts = {"api.wandb.ai"}
    if environ.get("WANDB_BASE_URL"):
        hosts.add(urlparse(environ["WANDB_BASE_URL"]).hostname or "")
    try:
        import wandb

        hosts.add(urlparse(wandb.Settings().base_url).hostname or "")
        entries = netrc.netrc(environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc"))
    except (ImportError, OSError, netrc.NetrcParseError):
        return False
    return any(entries.authenticators(host) for host in hosts if host)


def resolve_wandb_mode(mode: str | None, environ: Mapping[str, str] | None = None) -> str:
    """`mode` if given; else wandb's own WANDB_MODE if set; else "online" with credentials
    (WANDB_API_KEY or a `wandb login` netrc entry) and "offline" without (sync later with
    `wandb sync run_dir/wandb/offline-run-*`)."""
    environ = os.environ if environ is None else environ
    if mode is None and environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(environ["WANDB_MODE"], environ["WANDB_MODE"])
    if mode is not None:
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES} or None (automatic), got {mode!r}")
        return mode
    return "online" if environ.get("WANDB_API_KEY") or _wandb_netrc_login(environ) else "offline"


class WandbSink:
    """One wandb run with files under `run_dir/wandb/`. Every metric is plotted against
    `trainer/step` (the trainer's step, logged with each row), not wandb's internal step, so a
    resumed run does not trip over wandb's monotonic counter. Run summaries show the best value:
    min (and last) loss, max (and last) throughput and MFU."""

    STEP_METRIC = "trainer/step"
    SUMMARIES = {
        "loss": "min,last",
        "tokens_per_sec": "max,last",
        "tokens_per_sec_per_gpu": "max,last",
        "tflops_per_gpu": "max,last",
        "mfu": "max,last",
    }

    def __init__(
        self,
        project: str,
        name: str | None,
        group: str | None,
        tags: Sequence[str] | None,
        config: Mapping[str, Any],
        run_dir: str | os.PathLike,
        mode: str | None = None,
        entity: str | None = None,
    ):
        import wandb

        self._wandb = wandb
        self.mode = resolve_wandb_mode(mode)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            group=group,
            tags=list(tags) if tags else None,
            config=dict(config),
            dir=str(run_dir),
            mode=self.mode,
            entity=entity,
            reinit="create_new",  # this object owns its run; other runs in the process are left alone
        )
        self.run.define_metric(self.STEP_METRIC)
        self.run.define_metric("*", step_metric=self.STEP_METRIC)
        for key, summary in self.SUMMARIES.items():
            self.run.define_metric(key, step_metric=self.STEP_METRIC, summary=summary)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {key: _plain(value) for key, value in metrics.items() if value is not None}  # None breaks charts
        self.run.log({**row, self.STEP_METRIC: step})

    def log_histograms(self, step: int, histograms: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        """`histograms`: name -> (counts, bin_edges), e.g. from `expert_load_histograms`."""
        row = {key: self._wandb.Histogram(np_histogram=(list(c), list(e))) for key, (c, e) in histograms.items()}
        self.run.log({**row, self.STEP_METRIC: step})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


_WANDB_SETTING_KEYS = ("enabled", "project", "name", "group", "tags", "config", "run_dir", "mode", "entity")


def build_wandb_sink(settings: Mapping[str, Any]) -> WandbSink | None:
    """A WandbSink from a settings dict (keys `_WANDB_SETTING_KEYS`; `project` and `run_dir`
    required), or None when `enabled` is false or wandb is not installed (with a warning)."""
    unknown = sorted(set(settings) - set(_WANDB_SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown wandb settings {unknown}; valid keys: {list(_WANDB_SETTING_KEYS)}")
    if not settings.get("enabled", True):
        return None
    missing = [key for key in ("project", "run_dir") if not settings.get(key)]
    if missing:
        raise ValueError(f"wandb settings need {missing} (got {dict(settings)!r}); or set enabled=False")
    try:
        import wandb  # noqa: F401
    except ImportError:
        warnings.warn(
            "wandb is not installed, so nothing is logged to it (pip install wandb, or set enabled=False)", stacklevel=2
        )
        return None
    kwargs = {key: settings.get(key) for key in _WANDB_SETTING_KEYS if key != "enabled"}
    kwargs["config"] = kwargs["config"] or {}
    return WandbSink(**kwargs)


class MetricsLogger:
    """Sends each log to every sink on rank 0; on other ranks every call is a no-op (build their
    sinks with `build_sinks(rank=...)`, which makes none there, so no files or bars appear)."""

    def __init__(self, sinks: Sequence[Sink], rank: int):
        if rank != 0 and sinks:
            raise ValueError(
                f"rank {rank} was given {len(sinks)} sinks; only rank 0 logs (build_sinks(rank=...) makes none elsewhere)"
            )
        self.sinks, self.rank = list(sinks), rank

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_histograms(self, step: int, histograms: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        """To the sinks that draw histograms (wandb); the others skip them."""
        for sink in self.sinks:
            if hasattr(sink, "log_histograms"):
                sink.log_histograms(step, histograms)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def build_sinks(
    *,
    rank: int,
    total_steps: int,
    console: bool = True,
    print_every: int = 10,
    start_step: int = 0,
    jsonl_path: str | os.PathLike | None = None,
    wandb: Mapping[str, Any] | None = None,
) -> list[Sink]:
    """The sinks of rank 0 (none elsewhere): console if `console`, JSONL if `jsonl_path`, wandb if
    `wandb` settings are given (see `build_wandb_sink`)."""
    if rank != 0:
        return []
    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink(total_steps, print_every=print_every, start_step=start_step))
    if jsonl_path is not None:
        sinks.append(JsonlSink(jsonl_path))
    if wandb is not None:
        wandb_sink = build_wandb_sink(wandb)
        if wandb_sink is not None:
            sinks.append(wandb_sink)
    return sinks


def build_logger(*, rank: int, **sink_kwargs: Any) -> MetricsLogger:
    """`MetricsLogger(build_sinks(rank=rank, **sink_kwargs), rank)`."""
    return MetricsLogger(build_sinks(rank=rank, **sink_kwargs), rank)
