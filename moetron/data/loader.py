"""Deterministic, data-parallel-sharded, resumable batches of packed sequences.

Samples are non-overlapping windows of seq_len + 1 tokens cut from a TokenStream: window i holds
tokens [i * seq_len, i * seq_len + seq_len + 1), so consecutive windows share one token and every
token is predicted exactly once per epoch. Documents are packed back to back (see `pack_sample`).

The order is global, the same for any number of ranks:
  - sample s of the job (s = 0, 1, 2, ... forever) is window perm_e[s mod n_windows] of epoch
    e = s // n_windows, where perm_e is a permutation of the windows drawn by numpy's PCG64 seeded
    with (seed, e): reshuffled every epoch, the same in every process;
  - global micro-batch k is samples [k * B, (k + 1) * B) for micro_batch_size B;
  - rank r of dp_size D takes global micro-batches r, r + D, r + 2D, ...

So rank r's micro-step m of optimizer step t (accumulation A) is global micro-batch (t*A + m)*D + r,
and one step on D ranks sees the same samples as one step on 1 rank with accumulation A*D.

Epoch tails: nothing is dropped. The sample sequence runs from one epoch's permutation straight into
the next, so a micro-batch may hold the last windows of epoch e and the first of epoch e + 1; each
window still appears exactly once per epoch, and the data of global micro-batch k is a pure
function of (stream, seq_len, B, seed, k). That is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from moetron.data.dataset import TokenStream, pack_sample

if TYPE_CHECKING:  # torch is imported where batches are made: `moetron.data` (and the prepare CLI) load in
    import torch  # a fraction of a second without it


def count_windows(stream: TokenStream, seq_len: int) -> int:
    """How many whole windows of seq_len + 1 tokens (stepping by seq_len) the stream holds."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_windows = max(len(stream) - 1, 0) // seq_len
    if n_windows < 1:
        raise ValueError(
            f"{stream.name} has {len(stream)} tokens, too short for one sample of seq_len + 1 = {seq_len + 1} tokens"
        )
    return n_windows


def make_batch(stream: TokenStream, windows: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    """Read the given window indices and pack them: input_ids, labels, doc_ids, each (len(windows), seq_len) int64."""
    tokens = np.stack([stream[w * seq_len : w * seq_len + seq_len + 1] for w in windows.tolist()])  # (B, seq_len + 1)
    sample = pack_sample(tokens, stream.eos_id)
    import torch

    return {key: torch.from_numpy(value) for key, value in sample.items()}


def _check_ranks(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


class DataLoader:
    """Endless training batches for one data-parallel rank, in the global order of the module docstring.

    `next_batch()` -> {"input_ids", "labels", "doc_ids"}: int64 CPU tensors of shape (micro_batch_size, seq_len).
    `state_dict()` holds plain ints and is the same on every rank at an optimizer-step boundary;
    `load_state_dict` makes the loader continue exactly where the saved one stopped (the state counts
    global micro-batches, so a job may even resume on a different dp_size at a step boundary).
    """

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        _check_ranks(micro_batch_size, dp_rank, dp_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.stream = stream
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.n_windows = count_windows(stream, seq_len)
        # Global micro-batches of the job that lie before this rank's next round of dp_size of them.
        self.global_micro_batches = 0
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> (n_windows,) window order; at most two kept

    # -- the global order ------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """(n_windows,) window indices in the order epoch `epoch` visits them."""
        if epoch not in self._permutations:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                order = rng.permutation(self.n_windows)
            else:
                order = np.arange(self.n_windows)
            if len(self._permutations) >= 2:  # keep two: a micro-batch spans two epochs (more only if n_windows < B)
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = order
        return self._permutations[epoch]

    def windows_of(self, global_micro_batch: int) -> np.ndarray:
        """(micro_batch_size,) window indices of global micro-batch k: samples [k*B, (k+1)*B)."""
        samples = np.arange(
            global_micro_batch * self.micro_batch_size, (global_micro_batch + 1) * self.micro_batch_size
        )
        epochs, positions = np.divmod(samples, self.n_windows)
        windows = np.empty_like(samples)
        for epoch in np.unique(epochs).tolist():
            in_epoch = epochs == epoch
            windows[in_epoch] = self.permutation(epoch)[positions[in_epoch]]
        return windows

    def global_batch(self, global_micro_batch: int) -> dict[str, torch.Tensor]:
        """The batch of global micro-batch k, whichever rank takes it."""
        return make_batch(self.stream, self.windows_of(global_micro_batch), self.seq_len)

    # -- this rank's view ------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch: global micro-batch global_micro_batches + dp_rank."""
        batch = self.global_batch(self.global_micro_batches + self.dp_rank)
        self.global_micro_batches += self.dp_size
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Epochs the job has gone through, as a fraction (for logging)."""
        return self.global_micro_batches * self.micro_batch_size / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {
            "global_micro_batches": self.global_micro_batches,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "n_windows": self.n_windows,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`. The sample order must be the same: seed, seq_len, micro_batch_size,
        the number of windows (the data) and shuffle must match, else ValueError naming the field."""
        current = self.state_dict()
        for key in ("seed", "seq_len", "micro_batch_size", "n_windows", "shuffle"):
            if key in state and int(state[key]) != current[key]:
                raise ValueError(
                    f"DataLoader.load_state_dict: saved {key}={state[key]} but this loader has {key}={current[key]}; "
                    f"resuming would give a different sample order"
                )
        consumed = int(state["global_micro_batches"])
        if consumed < 0:
            raise ValueError(f"DataLoader.load_state_dict: global_micro_batches must be >= 0, got {consumed}")
        self.global_micro_batches = consumed


def eval_batches(
    stream: TokenStream,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches: windows in stream order, no shuffling, identical every call.

    Global micro-batch k holds windows [k*B, (k+1)*B); rank r takes r, r + D, ... Every rank yields
    the same number of batches (so a loss all-reduce lines up): min(max_batches, n_full // D), where
    n_full is the number of whole micro-batches in the stream; the windows past that are left out.
    """
    _check_ranks(micro_batch_size, dp_rank, dp_size)
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    n_windows = count_windows(stream, seq_len)
    per_rank = (n_windows // micro_batch_size) // dp_size
    if per_rank < 1:
        raise ValueError(
            f"{stream.name} has {len(stream)} tokens = {n_windows} windows of seq_len + 1 = {seq_len + 1}; "
            f"one evaluation round needs micro_batch_size * dp_size = {micro_batch_size * dp_size} windows"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for j in range(per_rank):
        k = dp_rank + j * dp_size
        yield make_batch(stream, np.arange(k * micro_batch_size, (k + 1) * micro_batch_size), seq_len)
