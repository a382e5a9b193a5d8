"""moetron.data.dataset: TokenStream slicing across shards, in-memory validation, and pack_sample."""

import numpy as np
import pytest

from moetron.data import TokenStream, pack_sample


def test_slices_cross_shard_boundaries():
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (5, 1, 0, 17, 3, 40)]
    full = np.concatenate(shards)
    stream = TokenStream(shards, eos_id=0, vocab_size=1000)
    assert len(stream) == len(full) == 66
    for _ in range(300):
        a, b = sorted(rng.integers(0, len(full) + 1, size=2).tolist())
        got = stream[a:b]
        assert got.dtype == np.uint16 and np.array_equal(got, full[a:b]), (a, b)
    assert np.array_equal(stream[:], full) and np.array_equal(stream[-10:], full[-10:])
    assert stream[30:10].shape == (0,)
    assert stream[0] == int(full[0]) and stream[-1] == int(full[-1]) and stream[22] == int(full[22])
    with pytest.raises(IndexError, match="token index 66 out of range for 66 tokens"):
        stream[66]
    with pytest.raises(ValueError, match="contiguous"):
        stream[::2]


def test_slices_are_copies():
    tokens = np.arange(10, dtype=np.uint16)
    stream = TokenStream.from_array(tokens, eos_id=0)
    piece = stream[2:5]
    piece[:] = 99
    assert stream[2:5].tolist() == [2, 3, 4]


def test_from_array_validation():
    with pytest.raises(ValueError, match=r"memory: token 3 \(byte offset 24\) is 7, outside the vocabulary \[0, 5\)"):
        TokenStream.from_array(np.array([0, 1, 2, 7, 1]), eos_id=0, vocab_size=5)
    with pytest.raises(ValueError, match=r"token 1 .* is -1, outside"):
        TokenStream.from_array(np.array([0, -1], dtype=np.int32), eos_id=0, vocab_size=5)
    with pytest.raises(ValueError, match="1-D integer array, got shape \\(2, 2\\)"):
        TokenStream.from_array(np.zeros((2, 2), dtype=np.int64), eos_id=0)
    with pytest.raises(ValueError, match=r"eos_id 9 is not in \[0, vocab_size=5\)"):
        TokenStream.from_array(np.zeros(4, dtype=np.int64), eos_id=9, vocab_size=5)


def test_pack_sample_by_hand():
    eos = 0
    window = np.array([5, 0, 7, 8, 0, 0, 9], dtype=np.uint16)  # seq_len 6; an empty document between two EOS
    sample = pack_sample(window, eos)
    assert sample["input_ids"].tolist() == [5, 0, 7, 8, 0, 0]
    assert sample["labels"].tolist() == [0, 7, 8, 0, 0, 9], "labels are not masked at EOS"
    assert sample["doc_ids"].tolist() == [0, 0, 1, 1, 1, 2], "a document starts right after each EOS"
    assert all(value.dtype == np.int64 for value in sample.values())

    starts_with_eos = pack_sample(np.array([0, 3, 4, 0]), eos)  # EOS at position 0 ends a previous document
    assert starts_with_eos["doc_ids"].tolist() == [0, 1, 1]
    assert starts_with_eos["labels"].tolist() == [3, 4, 0]  # an EOS label at the end opens no document here
    assert pack_sample(np.array([1, 2, 3, 4]), eos)["doc_ids"].tolist() == [0, 0, 0]


def test_pack_sample_batched_equals_per_row():
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 4, size=(5, 9))  # id 0 (EOS) is frequent
    batch = pack_sample(windows, eos_id=0)
    for row in range(5):
        single = pack_sample(windows[row], eos_id=0)
        for key in ("input_ids", "labels", "doc_ids"):
            assert batch[key].shape == (5, 8)
            assert np.array_equal(batch[key][row], single[key])
