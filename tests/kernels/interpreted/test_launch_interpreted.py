"""FastLaunch under TRITON_INTERPRET=1: no compiled kernels to remember, so every call goes through Triton."""

import torch
import triton
import triton.language as tl

from moetron.kernels.launch import FastLaunch


@triton.jit
def _scaled_copy(X, Y, n, scale, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(X + offs, mask=offs < n) * scale
    if NEGATE:
        y = -y
    tl.store(Y + offs, y, mask=offs < n)


def test_interpreter_falls_back_to_triton():
    launch = FastLaunch(_scaled_copy)
    assert not launch.enabled
    for negate in (True, False, True):
        x, y = torch.randn(100), torch.full((100,), float("nan"))
        launch((2,), x, y, 100, 3.0, BLOCK=64, NEGATE=negate)
        torch.testing.assert_close(y, -3.0 * x if negate else 3.0 * x)
    assert not launch.cache
