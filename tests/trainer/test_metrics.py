"""Training metrics: peak-FLOP/s table, throughput/MFU arithmetic, memory, MoE load scalars, and the
console / JSONL / wandb sinks (wandb offline, read back from its run file, with no network)."""

import io
import json
import math
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch

from moetron.trainer.metrics import (
    PEAK_BF16_TFLOPS,
    StepMetrics,
    cuda_device_name,
    expert_load_histograms,
    expert_load_metrics,
    peak_memory_stats_gb,
    peak_tflops,
)
from moetron.trainer.sinks import (
    JSONL_KEYS,
    ConsoleSink,
    JsonlSink,
    MetricsLogger,
    build_logger,
    build_sinks,
    build_wandb_sink,
    resolve_wandb_mode,
)


# ----------------------------------------------------------------------------- peak table
@pytest.mark.parametrize(
    "device_name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # what torch calls the SXM part
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("AMD Instinct MI300X", 1307.0),
        ("nvidia h100 pcie", 756.0),  # case does not matter
    ],
)
def test_peak_tflops_known_devices(device_name, expected):
    assert peak_tflops(device_name) == expected


@pytest.mark.parametrize("device_name", [None, "", "cpu", "NVIDIA GeForce RTX 3090", "Tesla V100-SXM2-16GB"])
def test_peak_tflops_unknown_is_none(device_name):
    assert peak_tflops(device_name) is None


def test_every_table_key_finds_itself_despite_shorter_keys_inside_it():
    # "H200" contains "H20", "L40S" contains "L4", "GB200" contains "B200": the longer key must win
    for key, value in PEAK_BF16_TFLOPS.items():
        assert peak_tflops(f"NVIDIA {key}") == value, key


def test_peak_tflops_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3", override=500) == 500.0
    assert peak_tflops(None, override=123.5) == 123.5
    with pytest.raises(ValueError, match="positive.*-1"):
        peak_tflops("NVIDIA H100 PCIe", override=-1)


# ----------------------------------------------------------------------------- throughput
def test_step_metrics_hand_computed():
    # 1e6 tokens in 2 s on 8 H100s, 6e9 training FLOPs per token
    m = StepMetrics.compute(
        step_time_s=2.0, tokens=1_000_000, world_size=8, flops_per_token=6e9, peak_tflops_per_gpu=989.0
    )
    assert m.tokens_per_sec == 500_000
    assert m.tokens_per_sec_per_gpu == 62_500
    assert m.tflops_per_gpu == pytest.approx(375.0, rel=1e-12)  # 6e9 * 62500 / 1e12
    assert m.mfu == pytest.approx(375.0 / 989.0, rel=1e-12)
    assert m.as_dict() == {
        "tokens_per_sec": 500_000,
        "tokens_per_sec_per_gpu": 62_500,
        "tflops_per_gpu": m.tflops_per_gpu,
        "mfu": m.mfu,
    }


def test_step_metrics_unknown_peak_and_bad_inputs():
    assert StepMetrics.compute(1.0, 4096, 1, 1e9, None).mfu is None
    with pytest.raises(ValueError, match="step_time_s.*0"):
        StepMetrics.compute(0.0, 4096, 1, 1e9)
    with pytest.raises(ValueError, match="world_size.*0"):
        StepMetrics.compute(1.0, 4096, 0, 1e9)
    with pytest.raises(ValueError, match="tokens.*-5"):
        StepMetrics.compute(1.0, -5, 1, 1e9)
    with pytest.raises(ValueError, match="peak_tflops_per_gpu.*0"):
        StepMetrics.compute(1.0, 4096, 1, 1e9, 0.0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_on_cpu_is_the_process_max_rss():
    if torch.cuda.is_available():
        pytest.skip("the CPU branch is what this checks")
    gb, reserved = peak_memory_stats_gb()
    status = Path("/proc/self/status").read_text()
    vm_hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert gb == pytest.approx(vm_hwm_kib / 2**20, rel=0.05)  # both are the peak RSS
    assert 0.01 < gb < 64
    assert reserved is None  # no caching allocator on the CPU


@pytest.mark.gpu
def test_cuda_peak_memory_resets_and_the_device_is_in_the_table():
    assert peak_tflops(cuda_device_name()) is not None, cuda_device_name()
    peak_memory_stats_gb()  # reset
    block = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    del block
    assert peak_memory_stats_gb()[0] >= 1.0
    assert peak_memory_stats_gb()[0] < 0.5  # the previous call reset the peak
    torch.cuda.empty_cache()
    peak_memory_stats_gb()  # reset
    block = torch.empty(2**28, dtype=torch.float32, device="cuda")
    del block  # (freed to the cache: still reserved)
    allocated, reserved = peak_memory_stats_gb()
    assert allocated >= 1.0 and reserved >= 1.0
    assert torch.cuda.memory_reserved() >= 2**30  # the cache holds it until emptied


# ----------------------------------------------------------------------------- MoE load
def hand_made_router_stats():
    return {
        "layers.1.ffn": {
            "tokens_per_expert": torch.tensor([4.0, 2.0, 2.0, 0.0]),
            "max_over_mean_load": torch.tensor(2.0),  # max 4 / mean 2
            "expert_bias": torch.tensor([0.1, -0.1, 0.3, -0.3]),
            "dropped_tokens": torch.tensor(5.0),
        },
        "layers.3.ffn": {
            "tokens_per_expert": torch.tensor([3.0, 3.0, 3.0, 3.0]),
            "max_over_mean_load": torch.tensor(1.0),
            "expert_bias": torch.tensor([0.0, 0.0, 0.2, -0.2]),
            "dropped_tokens": torch.tensor(1.0),
        },
    }


def test_expert_load_metrics_hand_computed():
    metrics = expert_load_metrics(hand_made_router_stats())
    assert metrics == pytest.approx(
        {
            "moe/max_over_mean_load": 1.5,
            "moe/max_over_mean_load_max": 2.0,
            "moe/layers.1.ffn/max_over_mean_load": 2.0,
            "moe/layers.3.ffn/max_over_mean_load": 1.0,
            "moe/dropped_tokens": 6.0,
            "moe/bias_abs_mean": (0.8 + 0.4) / 8,
        },
        rel=1e-6,
    )
    assert all(type(v) is float for v in metrics.values())  # plain scalars, JSON-ready
    assert expert_load_metrics({}) == {}


def test_expert_load_metrics_rejects_incomplete_stats():
    stats = hand_made_router_stats()
    del stats["layers.3.ffn"]["expert_bias"]
    with pytest.raises(KeyError, match="layers.3.ffn.*expert_bias"):
        expert_load_metrics(stats)


def test_expert_load_histograms_bin_per_expert():
    hists = expert_load_histograms(hand_made_router_stats())
    assert hists["moe/layers.1.ffn/tokens_per_expert"] == ([4.0, 2.0, 2.0, 0.0], [0, 1, 2, 3, 4])
    assert set(hists) == {"moe/layers.1.ffn/tokens_per_expert", "moe/layers.3.ffn/tokens_per_expert"}


def test_expert_load_metrics_from_a_real_model():
    from moetron.model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
        n_routed_experts=8, n_shared_experts=1, moe_ffn_hidden=16, top_k=2,
    )  # fmt: skip
    model = Transformer(cfg)
    model(torch.randint(0, 64, (2, 16)))
    stats = model.router_stats()
    metrics = expert_load_metrics(stats)
    assert set(stats) and all(f"moe/{layer}/max_over_mean_load" in metrics for layer in stats)
    for layer, s in stats.items():
        load = s["tokens_per_expert"]
        assert load.sum().item() == 2 * 16 * cfg.top_k  # every token went to top_k experts
        assert metrics[f"moe/{layer}/max_over_mean_load"] == pytest.approx((load.max() / load.mean()).item())


# ----------------------------------------------------------------------------- console
def step_metrics(step, **overrides):
    base = {"loss": 3.0 - 0.01 * step, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_sec": 123456.0,
            "tflops_per_gpu": 375.0, "mfu": 0.379, "mem_peak_gb": 41.5}  # fmt: skip
    return {**base, **overrides}


def test_console_plain_lines_when_not_a_tty():
    stream = io.StringIO()  # isatty() is False, like a Slurm log file
    sink = ConsoleSink(total_steps=100, print_every=3, stream=stream)
    for step in range(1, 8):
        sink.log(step, step_metrics(step))
    sink.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 1/100", "step 4/100", "step 7/100"]
    assert "\r" not in stream.getvalue()  # no progress-bar redraws
    assert "loss 2.9900" in lines[0] and "tok/s 123,456" in lines[0] and "MFU 37.9%" in lines[0]
    assert "mem 41.5GiB" in lines[0] and "lr 3.000e-04" in lines[0]


def test_console_bar_on_a_terminal_shows_postfix_and_plain_lines():
    stream = io.StringIO()
    sink = ConsoleSink(total_steps=10, print_every=5, stream=stream, use_bar=True)
    for step in range(1, 4):
        sink.log(step, step_metrics(step, mfu=None))  # unknown MFU is left out, not printed as None
    sink.close()
    out = stream.getvalue()
    assert "3/10" in out and "loss 2.9700" in out and "tok/s 123,456" in out
    assert "step 1/10 | loss 2.9900" in out and "None" not in out


# ----------------------------------------------------------------------------- JSONL
def _strict_json(line):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_lines_are_strict_json_with_the_required_keys(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, step_metrics(1, mfu=None, **expert_load_metrics(hand_made_router_stats())))
    sink.log(2, step_metrics(2, loss=float("nan"), grad_norm=float("inf"), lr=torch.tensor(1e-4)))
    sink.log(3, {"loss": 2.5, "tokens_per_sec": float("-inf")})  # missing keys become null
    assert path.read_text().count("\n") == 3  # flushed line by line, before close
    sink.close()

    rows = [_strict_json(line) for line in path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(JSONL_KEYS) <= set(row)
    assert rows[0]["mfu"] is None and rows[0]["loss"] == pytest.approx(2.99)
    assert rows[0]["moe/max_over_mean_load_max"] == 2.0
    assert rows[1]["loss"] == "nan" and rows[1]["grad_norm"] == "inf"
    assert math.isnan(float(rows[1]["loss"])) and rows[1]["lr"] == pytest.approx(1e-4)
    assert rows[2]["tokens_per_sec"] == "-inf" and rows[2]["mfu"] is None and rows[2]["lr"] is None

    JsonlSink(path).log(4, step_metrics(4))  # a resumed run appends
    assert [_strict_json(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_jsonl_rejects_a_non_scalar_value(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    with pytest.raises(TypeError, match="object"):
        sink.log(1, {"loss": object()})


# ----------------------------------------------------------------------------- logger, ranks
class RecordingSink:
    def __init__(self):
        self.calls, self.closed = [], False

    def log(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_logger_fans_out_on_rank_0():
    a, b = RecordingSink(), RecordingSink()
    logger = MetricsLogger([a, b], rank=0)
    logger.log(5, {"loss": 1.0})
    logger.log_histograms(5, {"h": ([1.0], [0, 1])})  # sinks without log_histograms skip it
    logger.close()
    assert a.calls == b.calls == [(5, {"loss": 1.0})] and a.closed and b.closed


def test_other_ranks_log_nothing(tmp_path, capsys):
    wandb_settings = {"project": "p", "run_dir": str(tmp_path / "wandb_run"), "mode": "offline"}
    logger = build_logger(rank=1, total_steps=10, jsonl_path=tmp_path / "metrics.jsonl", wandb=wandb_settings)
    logger.log(1, step_metrics(1))
    logger.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="rank 3"):
        MetricsLogger([RecordingSink()], rank=3)


def test_build_sinks_on_rank_0(tmp_path):
    sinks = build_sinks(
        rank=0, total_steps=10, console=False, jsonl_path=tmp_path / "m.jsonl", wandb={"enabled": False, "project": "p"}
    )
    assert [type(s) for s in sinks] == [JsonlSink]
    sinks[0].close()
    with pytest.raises(ValueError, match="projekt"):
        build_wandb_sink({"projekt": "p", "run_dir": str(tmp_path)})


def test_build_wandb_sink_without_wandb_installed_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        assert build_wandb_sink({"project": "p", "run_dir": str(tmp_path)}) is None


# ----------------------------------------------------------------------------- wandb
def test_resolve_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_wandb_mode(None, {}) == "offline"
    assert resolve_wandb_mode(None, {"WANDB_API_KEY": "k" * 40}) == "online"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}) == "offline"
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k" * 40}) == "disabled"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert resolve_wandb_mode(None, {"NETRC": str(netrc_file)}) == "online"  # `wandb login`
    with pytest.raises(ValueError, match="'onlin'"):
        resolve_wandb_mode("onlin", {})


def read_wandb_records(path):
    """Records of a .wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", data[:8]
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: block padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def history_row(history):
    """One logged row as a dict; a nested key (a histogram's "values", "bins") becomes nested dicts."""
    row = {}
    for item in history.item:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = row
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return row


@pytest.fixture
def no_network(monkeypatch):
    """Fails any connection of this process to a non-loopback address, and points every proxy
    variable at a local trap socket, which catches the HTTP(S) requests of wandb's separate
    wandb-core service process. Yields the list of requests the trap received."""
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network connection attempted to {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.1)
    trapped, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = trap.accept()
            except (TimeoutError, OSError):
                continue
            trapped.append(conn.recv(256))
            conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{trap.getsockname()[1]}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield trapped
    stop.set()
    server.join()
    trap.close()


def test_wandb_sink_runs_offline_without_credentials(tmp_path, monkeypatch, no_network):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_env" / var.lower()))
    wandb.teardown()  # a fresh wandb-core service, started under the proxy trap above
    run_dir = tmp_path / "run"
    config = {"model": {"d_model": 32, "n_layers": 2}, "optim": {"lr": 3e-4}}
    try:
        sinks = build_sinks(
            rank=0, total_steps=10, console=False,
            wandb={"project": "moetron-test", "name": "offline-check", "group": "g", "tags": ["t"], "config": config, "run_dir": str(run_dir)},
        )  # fmt: skip
        logger = MetricsLogger(sinks, rank=0)
        assert sinks[0].mode == "offline"
        for step in (10, 20, 30):
            logger.log(step, step_metrics(step, loss=4.0 - step / 10, mfu=None if step == 20 else 0.3))
        logger.log_histograms(30, expert_load_histograms(hand_made_router_stats()))
        logger.close()
    finally:
        wandb.teardown()
    assert no_network == []

    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")  # under run_dir, not WANDB_DIR
    (run_file,) = offline_run.glob("*.wandb")
    assert run_file.stat().st_size > 0
    records = read_wandb_records(run_file)
    rows = [history_row(r.history) for r in records if r.WhichOneof("record_type") == "history"]
    scalar_rows = [row for row in rows if "loss" in row]
    assert [row["trainer/step"] for row in scalar_rows] == [10, 20, 30]
    assert [row["loss"] for row in scalar_rows] == pytest.approx([3.0, 2.0, 1.0])
    assert "mfu" not in scalar_rows[1] and scalar_rows[0]["mfu"] == pytest.approx(0.3)  # None is not logged
    (hist_row,) = [row for row in rows if "moe/layers.1.ffn/tokens_per_expert" in row]
    assert hist_row["trainer/step"] == 30
    assert hist_row["moe/layers.1.ffn/tokens_per_expert"]["values"] == [4, 2, 2, 0]

    metrics = {
        r.metric.name or r.metric.glob_name: r.metric for r in records if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["*"].step_metric == "trainer/step"
    assert metrics["loss"].step_metric == "trainer/step" and metrics["loss"].summary.min
    assert metrics["mfu"].summary.max and metrics["tokens_per_sec"].summary.max

    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert logged_config["model"] == config["model"] and logged_config["optim"] == config["optim"]
    assert run_record.project == "moetron-test" and run_record.display_name == "offline-check"
    assert run_record.run_group == "g" and list(run_record.tags) == ["t"]
