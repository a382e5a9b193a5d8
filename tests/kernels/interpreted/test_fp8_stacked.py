"""Sibling weights quantized into their slices of joint FP8 forms (fp8_weights._stacked_weight_forms, the Triton
path under TRITON_INTERPRET=1): the same bytes as quantizing the stacked weights (both through the interpreter,
so its e4m3 cast is the same on both sides), dense (the last weight's rows not a multiple of 128: W^T's padding
columns) and per expert; no weight is copied. Without `transposed` (an input that needs no gradient) only W's forms
are made."""

import pytest
import torch

from moetron.kernels.fp8_quant_triton import quantize_128x128_dual_triton
from moetron.kernels.fp8_weights import _stacked_weight_forms


@pytest.mark.parametrize("shapes", [[(256, 256), (192, 256)], [(2, 128, 256), (2, 256, 256)]])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("transposed", [True, False])
def test_stacked_forms_equal_the_forms_of_the_stack(shapes, pow2, transposed):
    torch.manual_seed(0)
    weights = [torch.randn(*shape) * (i + 1) for i, shape in enumerate(shapes)]
    got = _stacked_weight_forms(weights, transposed, pow2, None)
    want = quantize_128x128_dual_triton(torch.cat(weights, dim=-2), pow2)
    if not transposed:
        assert got[2] is None and got[3] is None
        got, want = got[:2], want[:2]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(
            g.view(torch.uint8) if g.dtype != torch.float32 else g,
            w.view(torch.uint8) if w.dtype != torch.float32 else w,
        )
