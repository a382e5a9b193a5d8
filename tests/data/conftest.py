"""Fixtures of the data tests: one built-in tokenizer per session, trained once into a temporary cache."""

import numpy as np
import pytest

from moetron.data import TokenStream, builtin_tokenizer

VOCAB_SIZE = 2048


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_cache):
    """The built-in BPE (vocab 2048) trained on the built-in corpus, cached for the whole session."""
    return builtin_tokenizer(VOCAB_SIZE, tokenizer_cache)


@pytest.fixture(scope="session")
def tokenizer_json(tokenizer, tmp_path_factory):
    """A tokenizer.json of the session tokenizer, for the prepare CLI's --tokenizer PATH (no training)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(path)
    return path


@pytest.fixture
def random_stream():
    """make(n_tokens, seed=0) -> an in-memory stream of random ids in [1, 50) with EOS (0) at ~5% of positions."""

    def make(n_tokens: int, seed: int = 0) -> TokenStream:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(1, 50, size=n_tokens)
        tokens[rng.random(n_tokens) < 0.05] = 0
        return TokenStream.from_array(tokens.astype(np.uint16), eos_id=0, vocab_size=50, name="random split")

    return make
