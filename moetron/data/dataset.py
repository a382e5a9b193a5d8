"""Token streams on disk and in memory (`builtin_token_streams`: the built-in corpus), and sequence packing.

On disk, a prepared dataset is a directory written by `python -m moetron.data.prepare`:

    DIR/meta.json            dtype, vocab_size, eos_id, tokenizer, n_tokens and shards per split, sources
    DIR/tokenizer.json       the tokenizer that made the ids
    DIR/train_000000.bin ... raw little-endian token ids (uint16, or uint32 when vocab_size > 65536),
    DIR/val_000000.bin  ...  documents back to back, each followed by EOS

A split is the concatenation of its shards, read through read-only `np.memmap`s (nothing is loaded
until sliced). Validation on load (`TokenStream.from_dir`):
  - every shard's byte size must be a multiple of the dtype size and match the token count in
    meta.json (a truncated or foreign file fails here, naming the file and byte offset);
  - every token id is checked against vocab_size by a full, vectorized scan in chunks of 16M tokens
    (~0.2 s per GB from page cache, disk speed when cold; once per process). A bad id fails naming
    the file and position. The scan is skipped when the dtype cannot hold an id >= vocab_size (uint16 with a
    65536 vocab), and can be turned off with check_tokens=False for very large data sets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moetron.data.corpus import builtin_corpus, split_corpus
from moetron.data.tokenizer import Tokenizer, builtin_tokenizer, encode_documents

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "moetron-tokens-v1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # the dtypes token_dtype() picks
SCAN_CHUNK_TOKENS = 16 * 2**20


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise ValueError naming `where` and the first position whose id is outside [0, vocab_size)."""
    if tokens.dtype.kind == "u" and np.iinfo(tokens.dtype).max < vocab_size:
        return  # the dtype cannot hold an out-of-range id
    for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + SCAN_CHUNK_TOKENS])
        bad = chunk >= vocab_size
        if chunk.dtype.kind == "i":
            bad |= chunk < 0
        if bad.any():
            position = start + int(np.argmax(bad))
            raise ValueError(
                f"{where}: token {position} (byte offset {position * tokens.dtype.itemsize}) is "
                f"{int(tokens[position])}, outside the vocabulary [0, {vocab_size})"
            )


def read_meta(directory: str | os.PathLike) -> dict:
    """Read and check DIR/meta.json; errors name the file and the bad field."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the directory with `python -m moetron.data.prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    for key in ("dtype", "vocab_size", "eos_id", "n_tokens", "shards"):
        if key not in meta:
            raise ValueError(f"{path}: missing field {key!r}")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype {meta['dtype']!r} is not one of {sorted(DTYPES)}")
    vocab_size, eos_id = meta["vocab_size"], meta["eos_id"]
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"{path}: vocab_size must be a positive integer, got {vocab_size!r}")
    if meta["dtype"] == "uint16" and vocab_size > 2**16:
        raise ValueError(f"{path}: dtype uint16 cannot hold the ids of vocab_size {vocab_size}")
    if not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size:
        raise ValueError(f"{path}: eos_id {eos_id!r} is not in [0, vocab_size={vocab_size})")
    return meta


class TokenStream:
    """One split: the concatenation of 1-D token arrays (memmapped shards, or one in-memory array).

    `len(stream)` is the number of tokens; `stream[a:b]` returns a new (b - a,) np.ndarray, read
    across shard boundaries; `stream[i]` returns one id.
    """

    def __init__(self, shards: list[np.ndarray], eos_id: int, vocab_size: int | None = None, name: str = "stream"):
        self.shards = [shard for shard in shards if len(shard) > 0]
        self.eos_id = int(eos_id)
        self.vocab_size = vocab_size
        self.name = name
        lengths = [len(shard) for shard in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # (n_shards + 1,) shard starts
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.int64)

    @classmethod
    def from_array(
        cls, tokens: np.ndarray, eos_id: int, vocab_size: int | None = None, name: str = "memory"
    ) -> TokenStream:
        """An in-memory stream (e.g. the built-in corpus tokenized by the trainer). With `vocab_size`,
        every id is checked to lie in [0, vocab_size)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"{name}: tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
            )
        if vocab_size is not None:
            if not 0 <= eos_id < vocab_size:
                raise ValueError(f"{name}: eos_id {eos_id} is not in [0, vocab_size={vocab_size})")
            check_token_range(tokens, vocab_size, name)
        return cls([tokens], eos_id=eos_id, vocab_size=vocab_size, name=name)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, split: str, check_tokens: bool = True) -> TokenStream:
        """The `split` ("train" or "val") of a prepared directory, validated as the module docstring says."""
        directory = Path(directory)
        meta = read_meta(directory)
        meta_path = directory / META_FILE
        shards_meta = meta["shards"].get(split) if isinstance(meta["shards"], dict) else None
        if not shards_meta:
            available = (
                [name for name, shards in meta["shards"].items() if shards] if isinstance(meta["shards"], dict) else []
            )
            raise ValueError(f"{meta_path}: split {split!r} has no shards (splits with data: {available})")
        dtype = DTYPES[meta["dtype"]]
        shards = []
        for entry in shards_meta:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "n_tokens" not in entry:
                raise ValueError(f"{meta_path}: shard entry {entry!r} of split {split!r} needs 'file' and 'n_tokens'")
            path = directory / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {meta_path}) does not exist")
            n_bytes = path.stat().st_size
            if n_bytes % dtype.itemsize != 0:
                last_whole = n_bytes - n_bytes % dtype.itemsize
                raise ValueError(
                    f"{path}: size {n_bytes} bytes is not a multiple of the {meta['dtype']} size ({dtype.itemsize}); "
                    f"the file is truncated or not a token file (a partial token starts at byte offset {last_whole})"
                )
            n_tokens = n_bytes // dtype.itemsize
            if n_tokens != entry["n_tokens"]:
                raise ValueError(
                    f"{path}: holds {n_tokens} tokens ({n_bytes} bytes) but {meta_path} says {entry['n_tokens']}; "
                    f"the file is truncated or was rewritten (byte offset {min(n_tokens, entry['n_tokens']) * dtype.itemsize})"
                )
            shard = np.memmap(path, dtype=dtype, mode="r") if n_tokens > 0 else np.zeros(0, dtype=dtype)
            if check_tokens:
                check_token_range(shard, meta["vocab_size"], str(path))
            shards.append(shard)
        stream = cls(
            shards, eos_id=meta["eos_id"], vocab_size=meta["vocab_size"], name=f"split {split!r} of {directory}"
        )
        if len(stream) != meta["n_tokens"].get(split):
            raise ValueError(
                f"{meta_path}: n_tokens[{split!r}] = {meta['n_tokens'].get(split)} but its shards hold {len(stream)}"
            )
        return stream

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int | slice) -> np.ndarray | int:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError(f"{self.name}: slices must be contiguous (step 1), got step {step}")
            return self._read(start, max(stop, start))
        position = int(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"{self.name}: token index {index} out of range for {len(self)} tokens")
        return int(self._read(position, position + 1)[0])

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a new array, gathered from every shard the range touches."""
        out = np.empty(stop - start, dtype=self.dtype)
        # The shard holding `start`: offsets[k] <= start < offsets[k + 1].
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        written = 0
        while written < len(out):
            shard_start = start + written - int(self.offsets[k])
            take = min(len(out) - written, len(self.shards[k]) - shard_start)
            out[written : written + take] = self.shards[k][shard_start : shard_start + take]
            written += take
            k += 1
        return out

    def __repr__(self) -> str:
        return f"TokenStream({self.name}, n_tokens={len(self)}, shards={len(self.shards)}, eos_id={self.eos_id})"


def pack_sample(window: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Turn a window of seq_len + 1 packed tokens into one training sample (or a batch: (..., seq_len + 1)).

    input_ids = window[:-1], labels = window[1:] (int64, (..., seq_len)). Labels are not masked at EOS:
    as in GPT-style packing, the EOS position predicts the next document's first token. doc_ids
    (int64, (..., seq_len)) number the documents inside the window from 0: a new one starts at
    position 0 and right after every EOS in input_ids. Attention uses them to stay inside a document.
    """
    window = np.asarray(window)
    input_ids = window[..., :-1].astype(np.int64)  # (..., seq_len)
    labels = window[..., 1:].astype(np.int64)  # (..., seq_len)
    starts = np.zeros(input_ids.shape, dtype=np.int64)  # 1 where a document starts (except position 0)
    starts[..., 1:] = input_ids[..., :-1] == eos_id
    doc_ids = np.cumsum(starts, axis=-1)  # (..., seq_len)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}


def builtin_token_streams(
    vocab_size: int, cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.01, seed: int = 0
) -> tuple[Tokenizer, TokenStream, TokenStream]:
    """The built-in corpus tokenized in memory: (tokenizer, train stream, val stream), split by
    `split_corpus(builtin_corpus(), val_fraction, seed)` exactly as `prepare --builtin` splits it."""
    tokenizer = builtin_tokenizer(vocab_size, cache_dir)
    train_docs, val_docs = split_corpus(builtin_corpus(), val_fraction, seed)
    streams = [
        TokenStream.from_array(
            encode_documents(tokenizer, docs), tokenizer.eos_id, tokenizer.vocab_size, name=f"built-in {split}"
        )
        for split, docs in (("train", train_docs), ("val", val_docs))
    ]
    return tokenizer, streams[0], streams[1]
