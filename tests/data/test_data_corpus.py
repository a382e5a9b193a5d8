"""moetron.data.corpus: the built-in corpus is the same text in every process, about 1.5 MB,
deduplicated; split_corpus is a deterministic partition."""

import os
import subprocess
import sys

import pytest

from moetron.data import builtin_corpus, corpus_hash, split_corpus, split_documents

PRINT_HASH = "from moetron.data.corpus import builtin_corpus, corpus_hash; print(corpus_hash(builtin_corpus()))"


def test_corpus_identical_across_processes_and_hash_seeds():
    # Two fresh interpreters with different hash seeds (set/dict order of str differs between them),
    # and this pytest process, which has imported torch (torch patches inspect.getfile on import).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRINT_HASH],
            env={**env, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    hashes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        hashes.append(out.strip())
    import torch  # noqa: F401  (make sure the in-process corpus is built with torch imported)

    assert hashes[0] == hashes[1] == corpus_hash(builtin_corpus())


def test_corpus_size_and_content():
    docs = builtin_corpus()
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    assert 1_000_000 < n_bytes < 2_000_000, n_bytes
    assert all(doc.strip() == doc and doc for doc in docs), "no empty documents, no surrounding blank space"
    assert len(set(docs)) == len(docs), "documents are deduplicated"
    text = "\n".join(docs)
    assert 'The "if" statement' in text  # a pydoc topic (the language reference)
    assert "function json.dumps" in text and "Serialize ``obj`` to a JSON formatted ``str``" in text
    assert "Module collections.abc" in text or "class collections.abc" in text  # a listed submodule
    assert "Module antigravity" not in text and "Module this\n" not in text  # never imported (side effects)


def test_corpus_is_a_fresh_copy_each_call():
    docs = builtin_corpus()
    docs.clear()
    assert len(builtin_corpus()) > 100


def test_corpus_hash_separates_document_boundaries():
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])
    assert corpus_hash(["ab", "c"]) == corpus_hash(["ab", "c"])


def test_split_corpus_is_a_deterministic_partition():
    docs = [f"document {i}" for i in range(1000)]
    train, val = split_corpus(docs, 0.1, seed=3)
    assert (train, val) == split_corpus(docs, 0.1, seed=3)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 60 <= len(val) <= 140  # a seeded Bernoulli(0.1) draw per document
    assert train == [doc for doc in docs if doc in set(train)], "train keeps the input order"
    assert val == [doc for doc in docs if doc in set(val)], "val keeps the input order"
    assert split_corpus(docs, 0.1, seed=4)[1] != val, "the seed changes the split"
    assert split_corpus(docs, 0.0, seed=3) == (docs, [])


def test_split_corpus_edge_cases():
    assert split_corpus(["only"], 0.5) == (["only"], []), "a single document goes to train"
    train, val = split_corpus(["a", "b"], 0.001)
    assert len(train) == 1 and len(val) == 1, "val_fraction > 0 gives at least one val document"
    for seed in range(20):
        train, val = split_corpus(["a", "b", "c"], 0.99, seed=seed)
        assert train, "train is never empty"
    assert split_corpus([], 0.1) == ([], [])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_corpus(["a"], 1.0)


def test_split_documents_streams_the_same_rule():
    docs = [f"d{i}" for i in range(50)]
    pairs = list(split_documents(iter(docs), 0.2, seed=1))
    assert [doc for _, doc in pairs] == docs
    train, val = split_corpus(docs, 0.2, seed=1)
    assert [doc for split, doc in pairs if split == "val"] == val
    assert [doc for split, doc in pairs if split == "train"] == train
