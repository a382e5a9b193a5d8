"""One forward + backward of the Triton attention, for Nsight Compute: the autotuner runs first (two warm
calls), then one call inside the NVTX range "prof", which ncu selects.

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python3 bench/profile_attention.py mha|mla

NVTX ranges are per thread and autograd runs the CUDA backward on its own thread, so this range holds
the forward kernel only; profile the backward kernels by name (`--kernel-name regex:_bwd`) instead.
"""

import sys

import torch

from moetron.kernels import flash_attention

SHAPES = {  # (batch, heads, seq, head dim q/k, head dim v, causal)
    "mha": (4, 32, 4096, 128, 128, False),
    "mla": (2, 16, 8192, 192, 128, True),
}


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python bench/profile_attention.py {'|'.join(SHAPES)}")
    b, h, s, d, dv, causal = SHAPES[sys.argv[1]]
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, s, h, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        flash_attention(q, k, v, causal=causal).backward(torch.randn(b, s, h, dv, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    out = flash_attention(q, k, v, causal=causal)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
