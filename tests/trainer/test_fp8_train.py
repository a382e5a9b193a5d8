"""FP8 training through the trainer's layouts on the CPU: data parallelism over two gloo ranks and exact resume
after a kill, with `model.fp8.enabled=true` and the FP8 weight cache on (the torch references of the kernels run
here; the quantization arithmetic is the kernels', tested against them in tests/kernels)."""

import pytest
from omegaconf import OmegaConf

from tests.trainer.test_train import compose_cfg, fast, one_rank_and_two_ranks, straight_and_resumed

FP8 = ["model.d_model=128", "model.ffn_hidden=256", "model.moe_ffn_hidden=128", "model.fp8.enabled=true",
       "model.fp8.cache_weights=true", "model.mtp_depth=1"]  # fmt: skip


@pytest.mark.slow
def test_fp8_data_parallel_two_ranks_equal_one_rank(cache_dir, tmp_path):
    """2 gloo ranks x micro-batch 4 == 1 rank x 2 accumulated micro-batches of 4, in FP8. Each rank's tokens are
    one accumulated micro-batch's, so the per-token (1x128) and per-128-token (wgrad) quantization tiles are the
    same in both layouts; only the gradient sum's order differs."""
    a, b = one_rank_and_two_ranks(cache_dir, tmp_path, 6, *FP8)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[6] < a[1] - 0.1  # and it learns
    assert OmegaConf.load(tmp_path / "two" / "config.yaml").model.fp8.enabled


@pytest.mark.slow
def test_fp8_exact_resume_after_kill(cache_dir, tmp_path):
    """8 FP8 steps straight == 5 steps, SIGKILL (last checkpoint: step 4), resume to 8, loss for loss: the weight
    cache holds nothing a checkpoint must carry (it is rebuilt from the restored weights)."""
    r = straight_and_resumed(cache_dir, tmp_path, 8, 4, 5, *FP8)
    assert r["killed_returncode"] == -9
    assert r["steps_before"] == list(range(1, 6))
    a, b = r["straight"], r["resumed"]
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_fp8_nan_guard_sees_a_nan_weight(cache_dir, tmp_path):
    """A NaN in a weight that only FP8 GEMMs read (the first dense FFN's down projection, quantized 128x128 per
    step) reaches the loss through the quantizers and the GEMM, and the trainer's NaN guard stops the run."""
    import torch

    from moetron.kernels.fp8_linear import FP8Linear
    from moetron.train import run
    from moetron.trainer.step import NonFiniteError

    def poison(trainer, step, result):
        if step == 2:
            ffn = trainer.plain.layers["0"].ffn
            assert isinstance(ffn.down_proj, FP8Linear)
            with torch.no_grad():
                ffn.down_proj.weight[0, 0] = float("nan")

    cfg = compose_cfg(fast(cache_dir, tmp_path, "trainer.steps=4", "trainer.nan_policy=stop", *FP8))
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss=nan"):
        run(cfg, run_dir=tmp_path, callbacks=[poison])
