"""GPU checks of the model path (run through the device tool: `pytest -m gpu tests/model/test_gpu.py`)."""

import pytest
import torch

from moetron.kernels import flash_attention, grouped_gemm, grouped_gemm_reference
from moetron.kernels.grouped_gemm import torch_grouped_mm_supported
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config
from moetron.model.transformer import Documents
from moetron.parallel.apply import apply_activation_checkpointing

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_grouped_mm_used_on_hopper_and_matches_loop():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90")
    sizes = [0, 300, 17, 1000, 5, 0, 64, 126]
    x = torch.randn(sum(sizes), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ends = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    assert torch_grouped_mm_supported(x, w)
    grad = torch.randn(sum(sizes), 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (lambda: grouped_gemm(x, w, ends), lambda: grouped_gemm_reference(x, w, ends)):
        x.grad = w.grad = None
        # Freed NaN blocks of every size the call allocates: memory a kernel leaves unwritten (the weight gradient
        # of an expert without tokens: pytorch/pytorch#172439 on Blackwell) then shows as NaN, not as lucky zeros.
        junk = [torch.full_like(t, float("nan")) for t in (w, w, x, x, grad, grad)]
        del junk
        y = fn()
        y.backward(grad)
        results.append((y.float(), x.grad.float(), w.grad.float()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0.25, rtol=2e-2)  # bf16 outputs of 512-long dot products
    assert torch.equal(results[0][2][[0, 5]], torch.zeros_like(results[0][2][[0, 5]]))  # experts without tokens


@pytest.mark.parametrize("preset", ["tiny", "moe_debug"])
def test_model_on_gpu_matches_cpu_in_fp32(preset):
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    doc_ids = torch.tensor([[0] * 20 + [1] * 44, [2] * 64])
    cpu = model(ids, labels=ids, doc_ids=doc_ids)
    model.cuda()
    gpu = model(ids.cuda(), labels=ids.cuda(), doc_ids=doc_ids.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, atol=1e-5, rtol=1e-5)


def test_bf16_training_step_on_gpu():
    cfg = ModelConfig.from_preset("moe_debug")
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_token_id_is_a_python_error_not_a_device_assert():
    model = Transformer(ModelConfig.from_preset("tiny")).cuda()
    ids = torch.randint(0, 1024, (2, 16), device="cuda")
    ids[1, 3] = 5000
    with pytest.raises(ValueError, match="token id 5000"):
        model(ids)
    torch.cuda.synchronize()  # the context is still healthy


def test_sdpa_backend_mla_dims_bf16():
    q = torch.randn(2, 256, 8, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 256, 8, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    ref = flash_attention(q, k, v, causal=True, backend="torch")
    got = flash_attention(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("preset", ["tiny", "moe_debug"])
def test_triton_attention_model_step_matches_torch_backend(preset):
    """kernels.backend=triton vs the torch reference: same bf16 training step within bf16 tolerance."""
    import dataclasses

    cfg = ModelConfig.from_preset(preset)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    doc_ids = torch.cat([torch.zeros(2, 100), torch.ones(2, 156)], dim=1).long().cuda()
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, attention_backend=backend)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, doc_ids=doc_ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=2e-2, rtol=2e-3)
    # bf16 probabilities in the kernel vs fp32 in the reference, and a router decision that may flip
    # with them: compare the whole gradient tightly and each tensor loosely.
    a = torch.cat([g.flatten() for g in grads_a.values()])
    b = torch.cat([grads_b[n].flatten() for n in grads_a])
    assert (b - a).norm() / a.norm() < 2e-2
    for name, grad in grads_a.items():
        err = (grads_b[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert err < 0.15, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("fp8", ["off", "on", "cached"])
@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_training_micro_step_never_waits_for_the_gpu(fp8, checkpointing):
    """The trainer's forward and backward (packed documents and id checks prepared on the host) queue all
    their work without a host sync: MLA, MoE dispatch, MTP, FP8 layers, recomputation. torch's sync debug
    mode turns any synchronizing call into an error. The first call compiles and tunes kernels (which may
    sync) and is left out."""
    cfg = dict(vocab_size=1024, d_model=256, n_layers=3, max_seq_len=512, attention="mla", n_heads=2, q_lora_rank=128,
               kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn_hidden=512,
               n_routed_experts=4, n_shared_experts=1, moe_ffn_hidden=128, top_k=2, first_k_dense_replace=1,
               score_func="sigmoid", n_group=2, topk_group=1, bias_update_rate=1e-3, seq_aux_loss_alpha=1e-4,
               mtp_depth=1)  # fmt: skip
    fp8_cfg = FP8Config(enabled=fp8 != "off", cache_weights=fp8 == "cached")
    model = Transformer(ModelConfig(**cfg, fp8=fp8_cfg)).cuda()
    apply_activation_checkpointing(model, checkpointing)
    ids = torch.randint(0, 1024, (2, 512))
    doc_ids = torch.cat([torch.zeros(2, 200, dtype=torch.long), torch.ones(2, 312, dtype=torch.long)], 1)

    def micro_step():
        documents = Documents.on_host(doc_ids, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids.cuda(non_blocking=True), labels=ids.cuda(non_blocking=True), documents=documents,
                        check_ids=False)  # fmt: skip
        out.loss.backward()
        return out

    micro_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = micro_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
