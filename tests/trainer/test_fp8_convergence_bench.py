"""bench/fp8_convergence.py's wiring on the CPU (2 steps of a tiny model): the FP8 comparison, the noise-floor
mode, whose second BF16 run takes its own overrides, and the two runs trained at once (--concurrent)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--steps", "2", "--device", "cpu", "--seq-len", "64", "--micro-batch", "2", "--model", "moe_debug",
        "--override", "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.moe_ffn_hidden=128"]  # fmt: skip


def run_bench(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "c.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fp8_convergence.py"), "--out", str(out), "--work", str(tmp_path)]
    subprocess.run([*cmd, *TINY, *extra], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_noise_floor_mode(tmp_path):
    result = run_bench(tmp_path, "--second", "bf16", "--second-override", "kernels.backend=torch")
    assert set(result["runs"]) == {"bf16", "bf16_b"} and result["complete"]
    assert "model.fp8.enabled=false" in result["runs"]["bf16_b"]["overrides"]
    assert "kernels.backend=torch" in result["runs"]["bf16_b"]["overrides"]
    assert "kernels.backend=torch" not in result["runs"]["bf16"]["overrides"]
    comparison = result["comparison"]
    assert comparison["steps_compared"] == 2 and "final_loss_bf16_b" in comparison
    assert "passed" not in comparison  # the floor has no target of its own
    # (on the GPU the floor run overrides kernels.backend=sdpa; on the CPU the default backend is already the
    # torch reference, so this override changes nothing and the two runs agree exactly)
    assert comparison["rel_diff"] == 0.0
    # the held-out loss after step 1 (a split too small for one batch fails there) and after the last step,
    # for both runs, on the same batches: equal here too
    for run in result["runs"].values():
        assert run["eval"]["step"] == [1, 2] and all(loss > 0 for loss in run["eval"]["loss"])
    assert "data.val_fraction=0.15" in result["common_overrides"]
    assert comparison["eval_step"] == 2 and comparison["eval_rel_diff"] == 0.0
    # the largest gradient norm after step 10 (an early divergence): none in 2 steps
    assert comparison["max_grad_norm_after_step_10_bf16"] is None
    assert comparison["max_grad_norm_after_step_10_bf16_b"] is None


@pytest.mark.slow
def test_concurrent_runs_train_as_the_sequential_ones(tmp_path):
    """--concurrent trains BF16 and FP8 in two child processes at once: each run's losses, gradient norms and
    held-out losses are the sequential runs' exactly (same seeds, same data, nothing shared), and no throughput
    ratio is reported for runs that shared the machine."""
    sequential = run_bench(tmp_path / "seq")
    concurrent = run_bench(tmp_path / "conc", "--concurrent")
    assert concurrent["concurrent"] and concurrent["complete"] and "concurrent" not in sequential
    for name in ("bf16", "fp8"):
        a, b = sequential["runs"][name], concurrent["runs"][name]
        assert b["steps_done"] == 2 and not b.get("error")
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a["curve"][key] == b["curve"][key], (name, key)
        assert a["eval"] == b["eval"]
    assert concurrent["comparison"]["rel_diff"] == sequential["comparison"]["rel_diff"]
    assert "fp8_over_bf16_tokens_per_sec" in sequential["comparison"]
    assert "fp8_over_bf16_tokens_per_sec" not in concurrent["comparison"]


@pytest.mark.slow
def test_data_path_trains_on_the_standard_librarys_source(tmp_path):
    """bench/code_corpus.py prepares the standard library's .py files as shards (here cut at ~200k characters);
    --data-path trains both runs on them (data.source=bin) and records how much of the split the runs read."""
    data = tmp_path / "code"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "code_corpus.py"), "--out", str(data), "--max-chars", "200000"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    assert meta["n_tokens"]["train"] > 10_000 and meta["tokenizer"] == "builtin-8192"
    result = run_bench(tmp_path / "run", "--data-path", str(data))
    assert result["complete"]
    for run in result["runs"].values():
        assert {"data.source=bin", f"data.path={data}"} <= set(run["overrides"])
    assert result["data"]["n_tokens"] == meta["n_tokens"]
    assert result["data"]["epochs_read"] == round(2 * 64 * 2 / meta["n_tokens"]["train"], 3)
    # the held-out loss is measured on the prepared directory's val split
    assert result["runs"]["bf16"]["eval"]["step"] == [1, 2]


def test_code_corpus_reads_sorted_utf8_files_and_skips_the_rest(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from code_corpus import read_sources, stdlib_source_files
    finally:
        sys.path.pop(0)
    lib = tmp_path / "lib"
    for rel, body in {"b.py": b"x = 2\n", "a.py": b"y = 1\n", "pkg/c.py": b"z = 3\n", "bad.py": b"\xff\xfe",
                      "empty.py": b"  \n", "site-packages/d.py": b"w = 4\n", "notes.txt": b"no\n"}.items():  # fmt: skip
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes(body)
    files = stdlib_source_files(lib)
    assert [p.relative_to(lib).as_posix() for p in files] == ["a.py", "b.py", "bad.py", "empty.py", "pkg/c.py"]
    skipped = []
    assert list(read_sources(files, skipped=skipped)) == ["y = 1\n", "x = 2\n", "z = 3\n"]
    assert [p.name for p in skipped] == ["bad.py", "empty.py"]
    assert list(read_sources(files, max_chars=7)) == ["y = 1\n", "x = 2\n"]  # stops once 7 characters were read
    with pytest.raises(FileNotFoundError, match="no .py files"):
        stdlib_source_files(tmp_path / "empty_dir_that_is_missing")


@pytest.mark.slow
def test_merge_compares_runs_recorded_apart(tmp_path):
    """`convergence_results.py merge`: the BF16 and FP8 runs trained one at a time (--only) and merged compare as
    the pair trained by one command does; files of other settings, or without both runs, are refused."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from convergence_results import merge
    finally:
        sys.path.pop(0)
    pair = run_bench(tmp_path / "pair")
    bf16 = run_bench(tmp_path / "bf16", "--only", "bf16")
    fp8 = run_bench(tmp_path / "fp8", "--only", "fp8")
    paths = [str(tmp_path / name / "c.json") for name in ("bf16", "fp8")]
    merged = merge(paths, str(tmp_path / "merged.json"))
    assert json.loads((tmp_path / "merged.json").read_text()) == merged
    for key in ("steps_compared", "rel_diff", "eval_rel_diff", "step1_rel_diff", "passed"):
        assert merged["comparison"][key] == pair["comparison"][key], key
    assert "fp8_over_bf16_tokens_per_sec" not in merged["comparison"]  # (runs of other processes: no ratio)
    assert [m["file"] for m in merged["merged_from"]] == ["c.json", "c.json"]
    assert merged["runs"]["fp8"]["curve"] == fp8["runs"]["fp8"]["curve"]
    assert merged["runs"]["bf16"]["curve"] == bf16["runs"]["bf16"]["curve"]
    with pytest.raises(ValueError, match="a comparison needs bf16"):
        merge(paths[:1])
    other = run_bench(tmp_path / "other", "--only", "fp8", "--seed", "1")
    assert other["runs"]["fp8"]["steps_done"] == 2
    with pytest.raises(ValueError, match="other settings"):
        merge([paths[0], str(tmp_path / "other" / "c.json")])


def test_concurrent_second_run_waits_for_room(tmp_path, monkeypatch):
    """--concurrent on a GPU: the second child starts beside the first only if the memory free after the first's
    first step holds another run of the first's footprint (an H100 did not hold the mini pair)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fp8_convergence as fc
    finally:
        sys.path.pop(0)

    class Child:  # a running child process (poll() is None until `ended`)
        ended = False

        def poll(self):
            return 0 if self.ended else None

    out = tmp_path / "bf16.json"
    out.write_text(json.dumps({"runs": {"bf16": {"steps_done": 1, "peak_reserved_gb": 44.5}}}))
    for free_gib, fits in ((35.0, False), (48.0, False), (49.0, True), (90.0, True)):
        monkeypatch.setattr(fc.torch.cuda, "mem_get_info", lambda f=free_gib: (f * 2**30, 80 * 2**30))
        assert fc.wait_and_check_room(Child(), out, "bf16", poll_s=0) is fits, free_gib
    ended = Child()
    ended.ended = True  # a first run that already ended leaves the whole GPU
    assert fc.wait_and_check_room(ended, tmp_path / "missing.json", "bf16", poll_s=0)
    assert fc.second_fits(44.5, 48.5) and not fc.second_fits(44.5, 48.4)
