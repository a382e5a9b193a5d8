"""The built-in training corpus (Python's own documentation, gathered offline) and document splits.

Every Python install ships two bodies of English prose: the language reference topics behind
`help('if')` (`pydoc_data.topics`) and the docstrings of the standard library. Together they are
about 1.5 MB, enough to train a small BPE and to smoke-test a model end to end with no download.

The corpus must be identical between calls and between processes (every torchrun rank builds it,
and the tokenizer cache is keyed by its hash), whatever the caller imported before. It is therefore
collected by `_stdlib_docs.py` in a fresh, isolated interpreter (see that file for why and how),
under a wall-clock limit, and cached per process.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

COLLECTOR = Path(__file__).with_name("_stdlib_docs.py")
DEFAULT_TIMEOUT_S = 120.0  # the collector takes ~0.5 s; far longer means an import is stuck

_CACHE: list[str] | None = None
T = TypeVar("T")


def _run_collector(timeout_s: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="moetron-corpus-") as tmp:
        out_path = Path(tmp) / "corpus.json"
        # -I: ignore PYTHON* variables and the user site; -S: no site-packages and no .pth hooks.
        # cwd=tmp so that no module can read files from the caller's working directory.
        command = [sys.executable, "-I", "-S", str(COLLECTOR), str(out_path)]
        try:
            result = subprocess.run(command, cwd=tmp, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(
                f"builtin_corpus: collecting the standard library's docs took over {timeout_s:.0f} s "
                f"({' '.join(command)}); an import is stuck: add it to SKIP_MODULES in {COLLECTOR}"
            ) from err
        if result.returncode != 0 or not out_path.exists():
            stderr = result.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"builtin_corpus: {' '.join(command)} exited with status {result.returncode}:\n{stderr}")
        documents = json.loads(out_path.read_text(encoding="utf-8"))
    if not documents:
        raise RuntimeError(f"builtin_corpus: {COLLECTOR} found no documentation in {sys.executable}")
    return documents


def builtin_corpus(timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Python's documentation as a list of ~300 documents (~1.5 MB of UTF-8).

    One document per pydoc topic (sorted by topic name), then one per standard-library module
    (sorted by module name) holding its docstring and the docstrings of its public classes,
    functions and methods. Deduplicated, no empty documents, identical in every process that runs
    the same Python build. Collected once per process (in a subprocess), then served from memory.
    """
    global _CACHE
    if _CACHE is None:
        _CACHE = _run_collector(timeout_s)
    return list(_CACHE)  # a copy: a caller editing its list must not change the next caller's corpus


def corpus_hash(documents: list[str]) -> str:
    """A short, stable fingerprint of a list of documents (sha256 over the length-prefixed texts)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # so ["ab", "c"] and ["a", "bc"] differ
        digest.update(data)
    return digest.hexdigest()[:16]


def split_documents(documents: Iterable[T], val_fraction: float, seed: int = 0) -> Iterator[tuple[str, T]]:
    """Assign each document to "train" or "val" as it streams by: yields (split, document) in input order.

    Document i goes to val when the i-th draw of a PCG64 generator seeded with `seed` is below
    `val_fraction`, so the assignment depends only on (seed, position) and large inputs never need to
    be held in memory. The last document is held back one step to fix the two degenerate outcomes:
    it goes to train if nothing else did, and to val if val_fraction > 0 and nothing else did.
    A single document always goes to train.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.Generator(np.random.PCG64(seed))
    n_yielded = {"train": 0, "val": 0}
    pending: tuple[str, T] | None = None
    for document in documents:
        if pending is not None:
            yield pending
            n_yielded[pending[0]] += 1
        pending = ("val" if rng.random() < val_fraction else "train", document)
    if pending is not None:
        split, document = pending
        if n_yielded["train"] == 0:
            split = "train"
        elif n_yielded["val"] == 0 and val_fraction > 0:
            split = "val"
        yield split, document


def split_corpus(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs) by the rule of `split_documents`; both keep the input order.
    `python -m moetron.data.prepare` splits its inputs by the same rule."""
    train_docs, val_docs = [], []
    for split, doc in split_documents(docs, val_fraction, seed):
        (val_docs if split == "val" else train_docs).append(doc)
    return train_docs, val_docs
