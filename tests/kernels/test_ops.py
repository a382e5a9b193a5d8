"""moetron.kernels.ops.dispatch_visible: one custom op under dispatch modes, a plain call otherwise."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetron.kernels.ops import SAVED_OPS, dispatch_visible


class _Seen(TorchDispatchMode):
    """Records the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _scale_and_shift(x: torch.Tensor, scale: float, shift: bool) -> list[torch.Tensor]:
    y = x * scale
    return [y, y + 1.0] if shift else [y]


scale_and_shift = dispatch_visible("test_scale_and_shift", _scale_and_shift)


def test_one_op_under_a_mode_and_a_plain_call_otherwise():
    x = torch.randn(4, 8)
    plain = scale_and_shift(x, 2.0, True)
    with _Seen() as seen:
        under = scale_and_shift(x, 2.0, True)
    # the mode sees the custom op alone: the multiply and add inside ran below it
    assert seen.ops == [torch.ops.moetron.test_scale_and_shift.default]
    assert scale_and_shift.op is torch.ops.moetron.test_scale_and_shift.default
    assert scale_and_shift.op in SAVED_OPS
    for a, b in zip(plain, under, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(scale_and_shift(x, 3.0, False)) == 1  # a variable number of outputs


def test_without_a_mode_the_function_runs_directly(monkeypatch):
    """No custom-op dispatch outside modes (it costs ~30 us of host time a call): the registered op is not
    entered."""
    calls = []
    monkeypatch.setattr(
        torch._library.custom_ops.CustomOpDef, "__call__", lambda *a, **k: calls.append(1) or None, raising=True
    )
    out = scale_and_shift(torch.ones(2), 2.0, False)
    assert calls == [] and torch.equal(out[0], torch.full((2,), 2.0))
