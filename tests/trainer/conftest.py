"""Fixtures of the trainer tests."""

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One built-in tokenizer cache for the session's training runs (the BPE is trained once)."""
    return str(tmp_path_factory.mktemp("tokenizer-cache"))
