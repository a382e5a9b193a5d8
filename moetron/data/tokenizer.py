"""Tokenizers: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`, byte-level BPE training, and
the built-in tokenizer (trained once on the built-in corpus, then cached on disk).

Byte-level BPE (GPT-2, Radford et al. 2019): text is split by the GPT-2 regex, each piece is mapped
to bytes shown as 256 printable characters, and merges are learned on top, so any string encodes and
decodes back exactly. One special token, `<|endoftext|>`, ends every document (EOS).

Encoding treats the *text* "<|endoftext|>" inside a document as ordinary characters: a document
cannot inject an EOS; EOS ids are only ever appended by `encode_documents`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moetron.data.corpus import builtin_corpus, corpus_hash

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of well-known tokenizer.json files, tried in order when none is named.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>", "<|im_end|>", "<eos>")
BUILTIN_RECIPE = "bytelevel-bpe-v1"  # part of the cache key: bump when train_bpe's settings change
MIN_VOCAB_SIZE = 256 + 1  # the byte alphabet plus EOS


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its end-of-document id. Token ids are plain Python ints."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN, source: str = "<memory>"):
        eos_id = hf_tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"{source}: the tokenizer has no token {eos_token!r} to use as end of document")
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # see the module docstring: text never becomes EOS
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.source = source
        # One past the largest id, which can exceed the number of tokens when a vocab has gaps:
        # this is the bound that every token id is checked against.
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS or any other added token."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (encoded in parallel by the Rust library)."""
        return [encoding.ids for encoding in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; EOS is written out as "<|endoftext|>"."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face `tokenizer.json` (atomically: a reader never sees half a file)."""
        _write_atomic(Path(path), self.hf.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
        """Read a `tokenizer.json`. Without `eos_token`, the EOS is the `eos_token` of a
        `tokenizer_config.json` beside it, else the first of KNOWN_EOS_TOKENS that the vocabulary has."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({err})") from err
        if eos_token is None:
            eos_token = _find_eos_token(path, hf_tokenizer)
        return cls(hf_tokenizer, eos_token=eos_token, source=str(path))

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
        """Read `DIR/tokenizer.json` of a Hugging Face model directory (see `load` for the EOS)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json (a Hugging Face 'fast' tokenizer file)")
        return cls.load(path, eos_token=eos_token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}={self.eos_id}, source={self.source!r})"


def _find_eos_token(path: Path, hf_tokenizer: tokenizers.Tokenizer) -> str:
    config_path = path.with_name("tokenizer_config.json")
    if config_path.is_file():
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):  # {"content": "</s>", "lstrip": false, ...}
            eos = eos.get("content")
        if isinstance(eos, str) and hf_tokenizer.token_to_id(eos) is not None:
            return eos
    for candidate in KNOWN_EOS_TOKENS:
        if hf_tokenizer.token_to_id(candidate) is not None:
            return candidate
    raise ValueError(
        f"{path}: cannot tell the end-of-document token: no usable eos_token in {config_path.name} and none of "
        f"{list(KNOWN_EOS_TOKENS)} is in the vocabulary; pass eos_token=..."
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a shared cache must be readable by all
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>` (id 0). On a small corpus the trainer can run out
    of merges before `vocab_size`: the returned tokenizer's `vocab_size` is the real one."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + EOS), got {vocab_size}")
    hf_tokenizer = tokenizers.Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    hf_tokenizer.train_from_iterator(texts, trainer)
    return Tokenizer(hf_tokenizer, source=f"train_bpe(vocab_size={vocab_size})")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "moetron" / "tokenizers"


def builtin_tokenizer_path(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the built-in tokenizer of this vocab size is cached (the name holds the corpus hash)."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{BUILTIN_RECIPE}-v{vocab_size}-{corpus_hash(builtin_corpus())}.json"


def builtin_tokenizer(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The byte-level BPE trained on `builtin_corpus()`, cached as a tokenizer.json under `cache_dir`
    ("~" expanded; default ~/.cache/moetron/tokenizers) keyed by vocab size and corpus hash.

    Safe to call from many processes at once (torchrun ranks): on POSIX an exclusive lock on
    `<file>.lock` makes one process train while the others wait and then read its file; everywhere
    the file is written to a temporary name and renamed, so a reader never sees a partial file.
    Every process returns the tokenizer read back from the cached file, so all ranks hold the same one.
    """
    path = builtin_tokenizer_path(vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer.load(path, eos_token=EOS_TOKEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():  # another process may have trained it while we waited for the lock
            train_bpe(builtin_corpus(), vocab_size).save(path)
    return Tokenizer.load(path, eos_token=EOS_TOKEN)


class _exclusive_lock:
    """`with _exclusive_lock(path):` holds an flock on `path`; a no-op where fcntl does not exist."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: fall back on the atomic rename alone
            return self
        self.file = open(self.path, "a+")  # noqa: SIM115 (closed in __exit__)
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
        return False


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids below `vocab_size`: uint16 up to 65536, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str], dtype: np.dtype | None = None) -> np.ndarray:
    """One token stream: every document's ids followed by EOS, back to back. -> (n_tokens,) array of
    `dtype` (default `token_dtype(tokenizer.vocab_size)`)."""
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(tokenizer.vocab_size)
    pieces = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for ids in tokenizer.encode_batch(documents):
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(eos)
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(pieces)
