"""moetron.data.loader: the global sample order (one permutation per epoch), data-parallel sharding
that matches gradient accumulation on one rank, exact resumption, and fixed evaluation batches."""

import json

import numpy as np
import pytest
import torch

from moetron.data import DataLoader, TokenStream, eval_batches

SEQ_LEN = 8


def batches_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def stream(random_stream):
    """37 windows of 9 tokens: an epoch is 9.25 micro-batches of 4, so micro-batches straddle epochs."""
    return random_stream(37 * SEQ_LEN + 1 + 5)  # 5 spare tokens that make no window


def test_batch_contents(stream):
    loader = DataLoader(stream, SEQ_LEN, micro_batch_size=4, seed=7)
    assert loader.n_windows == 37
    windows = loader.windows_of(0)
    batch = loader.next_batch()
    for key in ("input_ids", "labels", "doc_ids"):
        assert batch[key].shape == (4, SEQ_LEN) and batch[key].dtype == torch.int64
    for row, w in enumerate(windows.tolist()):
        tokens = stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1].astype(np.int64)
        assert batch["input_ids"][row].tolist() == tokens[:-1].tolist()
        assert batch["labels"][row].tolist() == tokens[1:].tolist()
        is_start = np.r_[False, tokens[:-2] == stream.eos_id]
        assert batch["doc_ids"][row].tolist() == np.cumsum(is_start).tolist()


def test_every_window_once_per_epoch_and_reshuffled(stream):
    loader = DataLoader(stream, SEQ_LEN, micro_batch_size=4, seed=7)
    n_epochs = 5
    samples = np.concatenate([loader.windows_of(k) for k in range(37 * n_epochs // 4 + 1)])
    epochs = [samples[e * 37 : (e + 1) * 37] for e in range(n_epochs)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(37))
    assert len({tuple(order.tolist()) for order in epochs}) == n_epochs, "a new permutation every epoch"
    # The windows a batch holds are the data it returns, also for a batch that straddles two epochs.
    straddling = 9  # samples 36..39: the last of epoch 0 and the first three of epoch 1
    assert samples[36:40].tolist() == loader.windows_of(straddling).tolist()
    assert batches_equal(loader.global_batch(straddling), DataLoader(stream, SEQ_LEN, 4, seed=7).global_batch(9))


def test_seeds_and_shuffle_off(stream):
    first = [DataLoader(stream, SEQ_LEN, 4, seed=seed).windows_of(0).tolist() for seed in (0, 1, 0)]
    assert first[0] == first[2] and first[0] != first[1]
    ordered = DataLoader(stream, SEQ_LEN, 4, shuffle=False)
    assert [ordered.windows_of(k).tolist() for k in (0, 9)] == [[0, 1, 2, 3], [36, 0, 1, 2]]


@pytest.mark.parametrize("dp_size, accumulation", [(2, 3), (4, 1), (3, 2)])
def test_data_parallel_ranks_match_one_rank_with_accumulation(stream, dp_size, accumulation):
    n_steps = 7  # 7 * A * D micro-batches of 4: several epochs of 37 windows
    single = DataLoader(stream, SEQ_LEN, 4, dp_rank=0, dp_size=1, seed=3)
    ranks = [DataLoader(stream, SEQ_LEN, 4, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    for step in range(n_steps):
        reference = [single.next_batch() for _ in range(accumulation * dp_size)]  # one step on one rank
        for m in range(accumulation):
            for r, loader in enumerate(ranks):
                # rank r's micro-step m of this step is global micro-batch (step*A + m)*D + r
                assert batches_equal(loader.next_batch(), reference[m * dp_size + r]), (step, m, r)


@pytest.mark.parametrize("stop_after", [3, 9, 10, 23])  # mid-epoch, at and just past an epoch boundary
def test_resume_reproduces_the_uninterrupted_sequence(stream, stop_after):
    for dp_size in (1, 2):
        for rank in range(dp_size):
            uninterrupted = DataLoader(stream, SEQ_LEN, 4, dp_rank=rank, dp_size=dp_size, seed=11)
            expected = [uninterrupted.next_batch() for _ in range(stop_after + 12)]
            first = DataLoader(stream, SEQ_LEN, 4, dp_rank=rank, dp_size=dp_size, seed=11)
            for _ in range(stop_after):
                first.next_batch()
            state = json.loads(json.dumps(first.state_dict()))  # plain ints: survives any checkpoint format
            resumed = DataLoader(stream, SEQ_LEN, 4, dp_rank=rank, dp_size=dp_size, seed=11)
            resumed.load_state_dict(state)
            for i in range(12):
                assert batches_equal(resumed.next_batch(), expected[stop_after + i]), (dp_size, rank, i)


def test_resume_on_a_different_dp_size(stream):
    # Two ranks stop after 5 steps of 2 micro-batches; one rank takes over the same global sequence.
    ranks = [DataLoader(stream, SEQ_LEN, 4, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for _ in range(5 * 2):
        for loader in ranks:
            loader.next_batch()
    assert ranks[0].state_dict() == ranks[1].state_dict(), "the state is the same on every rank at a step boundary"
    single = DataLoader(stream, SEQ_LEN, 4, seed=5)
    single.load_state_dict(ranks[0].state_dict())
    reference = DataLoader(stream, SEQ_LEN, 4, seed=5)
    for k in range(20, 26):
        assert batches_equal(single.next_batch(), reference.global_batch(k))


def test_state_mismatch_and_bad_arguments(stream):
    state = DataLoader(stream, SEQ_LEN, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved seq_len=8 but this loader has seq_len=4"):
        DataLoader(stream, 4, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved seed=1 but this loader has seed=2"):
        DataLoader(stream, SEQ_LEN, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="need 0 <= dp_rank < dp_size, got dp_rank=2, dp_size=2"):
        DataLoader(stream, SEQ_LEN, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        DataLoader(stream, SEQ_LEN, 0)


def test_stream_too_short(random_stream):
    short = random_stream(8)
    with pytest.raises(ValueError, match=r"random split has 8 tokens, too short for one sample of seq_len \+ 1 = 9"):
        DataLoader(short, SEQ_LEN, 2)
    one_window = random_stream(9)
    loader = DataLoader(one_window, SEQ_LEN, 3)  # fewer windows than a micro-batch: the window repeats
    assert loader.next_batch()["input_ids"].tolist() == [one_window[0:8].tolist()] * 3


def test_eval_batches_fixed_and_rank_sharded(stream):
    def collect(**kwargs):
        return list(eval_batches(stream, SEQ_LEN, 4, **kwargs))

    single = collect()
    assert len(single) == 37 // 4  # whole micro-batches only
    assert all(batches_equal(a, b) for a, b in zip(single, collect()))  # identical every call
    assert single[1]["input_ids"][0].tolist() == stream[4 * SEQ_LEN : 5 * SEQ_LEN].astype(np.int64).tolist()
    ranks = [collect(dp_rank=r, dp_size=3) for r in range(3)]
    assert [len(batches) for batches in ranks] == [3, 3, 3], "every rank gets the same number of batches"
    for j in range(3):
        for r in range(3):
            assert batches_equal(ranks[r][j], single[j * 3 + r])
    assert len(collect(max_batches=2)) == 2 and len(collect(dp_rank=1, dp_size=2, max_batches=10)) == 4
    with pytest.raises(ValueError, match="one evaluation round needs micro_batch_size \\* dp_size = 40 windows"):
        collect(dp_size=10)


def test_memmapped_split_feeds_the_loader(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 100, size=1000).astype("<u2")
    tokens[:333].tofile(tmp_path / "a.bin")
    tokens[333:].tofile(tmp_path / "b.bin")
    shards = [np.memmap(tmp_path / name, dtype="<u2", mode="r") for name in ("a.bin", "b.bin")]
    stream = TokenStream(shards, eos_id=0, vocab_size=100, name="two memmapped shards")
    in_memory = TokenStream.from_array(tokens, eos_id=0, vocab_size=100)
    a, b = DataLoader(stream, 16, 8, seed=2), DataLoader(in_memory, 16, 8, seed=2)
    for _ in range(10):
        assert batches_equal(a.next_batch(), b.next_batch())
