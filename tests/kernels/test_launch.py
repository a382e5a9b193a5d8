"""FastLaunch (moetron/kernels/launch.py): the signature separates every argument property a compiled
Triton kernel is specialized on; on the GPU a remembered kernel gives the bytes Triton's own launch gives,
across alignments, integer classes, tuned keys and constexprs. The interpreter fallback:
tests/kernels/interpreted/test_launch_interpreted.py."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moetron.kernels import launch
from moetron.kernels.launch import FastLaunch, cdiv, host_descriptor, next_power_of_2, signature


def test_signature_separates_what_triton_specializes_on():
    base = torch.empty(64, dtype=torch.float32)
    aligned, misaligned = base[:32], base[1:33]  # 4-byte offset: not 16-byte aligned
    assert signature((aligned,)) == signature((base[4:36],))  # both 16-byte aligned
    assert signature((aligned,)) != signature((misaligned,))
    assert signature((aligned,)) != signature((aligned.to(torch.float16),))
    # integers: 1, multiples of 16, other values, and their width
    assert signature((32,)) == signature((4096,))
    assert len({signature((v,)) for v in (1, 16, 17, 2**31, 2**63)}) == 5
    assert signature((17,)) == signature((1001,))
    # values kept whole at key positions (constexprs and the autotuner's key)
    assert signature((17, 1024), key_positions=(1,)) != signature((17, 2048), key_positions=(1,))
    assert signature((True,)) != signature((False,))
    assert signature((None,)) != signature((0,))


def test_signature_memos_give_the_unmemoized_classes(monkeypatch):
    """The memos of integer and descriptor-dimension classes (kept below a size bound by clearing them) give
    exactly what the classes computed afresh give, before, across and after a clearing."""
    monkeypatch.setattr(launch, "_INT_CLASSES", {})
    values = [1, 16, 17, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, *range(0, 40000, 3)]  # past the bound: clears
    for v in values + values[:50]:
        assert signature((v,)) == (launch._int_class(v),), v
    assert len(launch._INT_CLASSES) <= 1 << 14


def test_signature_of_descriptors():
    """Host TMA descriptors: equal signatures exactly when base dtype and alignment, the classes of shape and
    strides, block shape and layout agree (host_descriptor's and Gluon's own constructor alike)."""
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    other_layout = gl.NVMMASharedLayout.get_default_for([64, 64], gl.float8e4nv)
    x = torch.zeros(4096, 256, dtype=torch.float8_e4m3fn)

    def sig(t, block=(64, 128), lay=layout):
        return signature((host_descriptor(t, list(block), lay),))

    assert sig(x) == signature((TensorDescriptor.from_tensor(x, [64, 128], layout),))
    assert sig(x) == sig(x[:2048])  # rows 4096 and 2048: both multiples of 16
    assert sig(x) != sig(x[:2047])  # not a multiple of 16
    assert sig(x) != sig(x[:1])  # one row
    assert sig(x) == sig(x[:, :128])  # 256 and 128 columns: both multiples of 16, the same row stride
    assert sig(x) != sig(x[1:])  # base 256 bytes on: aligned, but 4095 rows
    assert sig(x) != sig(x.view(torch.int8))  # the same bytes, another dtype
    assert sig(x) != sig(x, block=(64, 64), lay=other_layout)


def test_host_descriptor_fields_and_checks():
    """host_descriptor holds what TensorDescriptor.from_tensor holds, and refuses what TMA cannot read."""
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    x = torch.zeros(300, 256, dtype=torch.bfloat16)
    ours, theirs = host_descriptor(x, [64, 128], layout), TensorDescriptor.from_tensor(x, [64, 128], layout)
    for field in ("base", "shape", "strides", "block_shape", "layout", "padding"):
        assert getattr(ours, field) == getattr(theirs, field) if field != "base" else ours.base is theirs.base
    assert isinstance(ours, TensorDescriptor)
    with pytest.raises(ValueError, match="16-byte aligned"):
        host_descriptor(x.view(-1)[1:].view(-1)[: 299 * 256].view(299, 256), [64, 128], layout)  # base + 2 bytes
    with pytest.raises(ValueError, match="unit last stride"):
        host_descriptor(x.t(), [64, 128], layout)
    with pytest.raises(ValueError, match="row strides"):
        host_descriptor(torch.zeros(300, 260, dtype=torch.bfloat16)[:, :256], [64, 128], layout)  # 520-byte rows


@triton.jit
def _scaled_copy(X, Y, n, stride, scale, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs * stride, mask=offs < n)
    y = x * scale
    if NEGATE:
        y = -y
    tl.store(Y + offs, y, mask=offs < n)


def test_host_integer_helpers_match_triton():
    """cdiv and next_power_of_2 give triton.cdiv's and triton.next_power_of_2's values (the launchers use them
    for grids and tile counts instead of Triton's jit-callable versions, ~6 us a call)."""
    for a in [0, 1, 2, 127, 128, 129, 1000, 2**31 + 5, 2**40]:
        for b in (1, 3, 64, 128, 192, 256):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in [1, 2, 3, 63, 64, 65, 1000, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@pytest.mark.gpu
def test_remembered_kernel_matches_triton_across_signatures():
    """Every variation a compiled kernel depends on, each launched twice (the second through the fast path),
    interleaved so that a wrongly re-used binary would show."""
    launch = FastLaunch(_scaled_copy)
    assert launch.enabled
    base = torch.randn(2 * 4096 + 64, device="cuda")
    cases = []
    for offset in (0, 1, 4):  # aligned, misaligned, aligned again
        for n in (1, 17, 4096):
            for stride in (1, 2):
                for negate in (False, True):
                    cases.append((offset, n, stride, negate))
    for _ in range(2):
        for offset, n, stride, negate in cases:
            x = base[offset:]
            y = torch.full((n,), float("nan"), device="cuda")
            launch(lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),), x, y, n, stride, 1.5, BLOCK=128, NEGATE=negate)
            want = 1.5 * x[: n * stride : stride]
            torch.testing.assert_close(y, -want if negate else want, rtol=0, atol=0)
    assert 1 < len(launch.cache) <= len(cases)


@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 256})], key=["n"])
@triton.jit
def _tuned_copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)


@pytest.mark.gpu
def test_autotuned_kernel_keeps_its_config_per_key():
    """The grid comes from the config the autotuner chose for that key, on every fast launch."""
    launch = FastLaunch(_tuned_copy)
    for _ in range(3):
        for n in (100, 5000, 70000):
            x = torch.randn(n, device="cuda")
            y = torch.full_like(x, float("nan"))
            launch(lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),), x, y, n)
            torch.testing.assert_close(y, x + 1.0, rtol=0, atol=0)
    assert len(launch.cache) == 3
    for (_, _, sig, _), (_, meta, _, _, _) in launch.cache.items():
        assert meta["BLOCK"] == _tuned_copy.cache[(sig[-1], "torch.float32", "torch.float32")].kwargs["BLOCK"]


@pytest.mark.gpu
def test_pinned_config_is_the_one_launched(monkeypatch):
    """Tests pin one autotuner config at a time by replacing the config list: each pin launches its own config,
    not the kernel remembered for an earlier list with the same signature."""
    launch = FastLaunch(_tuned_copy)
    n = 1000
    x = torch.randn(n, device="cuda")
    for block in (32, 256, 32):
        monkeypatch.setattr(_tuned_copy, "configs", [triton.Config({"BLOCK": block})])
        for _ in range(2):
            y = torch.full_like(x, float("nan"))
            launch(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n)
            torch.testing.assert_close(y, x + 1.0, rtol=0, atol=0)
        (entry,) = [e for k, e in launch.cache.items() if k[1] == id(_tuned_copy.configs)]
        assert entry[1]["BLOCK"] == block
