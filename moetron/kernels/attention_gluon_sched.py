"""Work distribution of the Gluon attention forward (attention_gluon.py): which query block a work item is,
how the loader hands an item to the consumer warpgroups, the counter the programs take items from, and which
key blocks a query block visits (`_key_range`, shared with the backward's dQ kernel).

A work item is one query block of one (sequence, head). Programs take items as they finish: each program
starts with item `program_id`, then its loader takes `programs + atomic_add(counter, 1)` until the items run
out (dynamic scheduling). Causal items run longest first, within sections of (sequence, head) pairs whose
keys and values fit in L2 together, so the short items fill the tail: the static schedule this replaced
(round-robin units of two blocks) left ~3% of the SMs' time idle in the last wave
(bench/results/attention_sched_experiment.json).
"""

from __future__ import annotations

import itertools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from moetron.kernels.launch import cdiv

L2_SECTION = 16 << 20  # bytes of keys and values the causal item order keeps live in L2 (see _item; 16 MB
# measured 1-2% faster than 32 and 64 MB, bench/results/attention_sched_experiment.json)


def l2_section(n_bh: int, kv_bytes: float) -> int:
    """(sequence, head) pairs per causal section: as many as L2_SECTION holds at kv_bytes of keys and values
    per query head, at least one, and sections of equal size."""
    section = max(1, min(n_bh, int(L2_SECTION // max(kv_bytes, 1))))
    return cdiv(n_bh, cdiv(n_bh, section))


@gluon.jit
def _item(t, n_q_blocks, n_heads, n_bh, section, cu_q, cu_k, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """Work item t -> (head, first query and key rows of its sequence, their lengths, first query of its
    block). Without a mask the query blocks of one (sequence, head) are consecutive items: they share its
    keys and values in L2. Causal items run longest first, within sections of `section` (sequence, head)
    pairs whose keys and values fit in L2 together: the last query block of each pair of the section, then
    the one before, ... Programs take items as they finish (_loader), so the short ones at the end fill
    the tail."""
    if CAUSAL:
        per_section = section * n_q_blocks
        first = t // per_section * section  # the section's first (sequence, head)
        heads = gl.minimum(section, n_bh - first)
        r = t % per_section
        bh = first + r % heads
        pid_m = n_q_blocks - 1 - r // heads
    else:
        bh = t // n_q_blocks
        pid_m = t % n_q_blocks
    b = bh // n_heads
    q_start = gl.load(cu_q + b)
    k_start = gl.load(cu_k + b)
    q_len = gl.load(cu_q + b + 1) - q_start
    return bh % n_heads, q_start, k_start, q_len, gl.load(cu_k + b + 1) - k_start, pid_m * BLOCK_M


@gluon.jit
def _put_item(slot, h, q_start, k_start, q_len, k_len, m0):
    """Store a work item's (head, q_start, k_start, q_len, k_len, m0) in shared memory for the consumers
    (h = -1: no item left). Every thread holds all eight words, so every thread's store writes them."""
    layout: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    k = gl.arange(0, 8, layout=layout)
    words = gl.where(k == 0, h, gl.where(k == 1, q_start, gl.where(k == 2, k_start, gl.where(k == 3, q_len,
                     gl.where(k == 4, k_len, m0)))))  # fmt: skip
    slot.store(words)


@gluon.jit
def _get_item(slot):
    """The work item _put_item stored in slot: each thread reads the eight words and picks them apart in its
    own registers."""
    layout: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    k = gl.arange(0, 8, layout=layout)
    words = slot.load(layout)
    return (gl.sum(gl.where(k == 0, words, 0), 0), gl.sum(gl.where(k == 1, words, 0), 0),
            gl.sum(gl.where(k == 2, words, 0), 0), gl.sum(gl.where(k == 3, words, 0), 0),
            gl.sum(gl.where(k == 4, words, 0), 0), gl.sum(gl.where(k == 5, words, 0), 0))  # fmt: skip


_COUNTER_SLOTS = 256
_counters: dict[torch.device, tuple[torch.Tensor, itertools.count]] = {}


def _item_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 pair for one launch: (items taken, programs done). Launches take the slots of a per-device
    ring in turn, and each launch's last program zeroes its pair again: no per-call torch.zeros (a fill
    kernel: ~13 us of host time per call on the H100 machine). Kernels in flight at once on different streams
    get different slots unless 256 launches are in flight together."""
    if device not in _counters:
        _counters[device] = (torch.zeros(_COUNTER_SLOTS, 2, dtype=torch.int32, device=device), itertools.count())
    ring, turn = _counters[device]
    return ring[next(turn) % _COUNTER_SLOTS]


@gluon.jit
def _key_range(m0, k_len, offset, window, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, MIN_BLOCKS: gl.constexpr):  # fmt: skip
    """Key blocks a query block [m0, m0 + BLOCK_M) visits, [lo, hi); from `full` on they need a mask (the
    causal diagonal, the partial last block, every block of a window). MIN_BLOCKS = 1 (the forward): a
    query block that sees no key at all still runs one fully masked block (its output is 0, its
    logsumexp -inf); the backward's dQ kernel passes 0."""
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = gl.minimum(k_len, m0 + BLOCK_M + offset)
        full = gl.maximum(0, gl.minimum(m0 + offset + 1, k_len)) // BLOCK_N * BLOCK_N
    else:
        full = k_len // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = gl.maximum(0, (m0 + offset - window + 1) // BLOCK_N * BLOCK_N)
        full = lo
    hi = gl.maximum(hi, lo + MIN_BLOCKS)
    full = gl.minimum(gl.maximum(full, lo), hi)
    return lo, full, hi
