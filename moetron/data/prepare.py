"""Tokenize documents into a prepared directory of token shards (the in-memory path is `dataset.builtin_token_streams`).

    python -m moetron.data.prepare --input a.jsonl b.txt --out data/mine [--tokenizer builtin|PATH]
        [--vocab-size 8192] [--val-fraction 0.01] [--seed 0] [--text-key text] [--split-lines]
        [--shard-tokens 100000000] [--builtin] [--overwrite]

Documents are read file by file (see `sources.py`), assigned to train or val by
`corpus.split_documents` (seeded, streaming), tokenized in batches, each followed by EOS, and
appended to `DIR/{split}_{index:06d}.bin` shards of at most --shard-tokens tokens (a document may
continue into the next shard: a split is read as one stream). The layout is described in
`dataset.py`. meta.json is written last, so a directory without it is an unfinished run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moetron.data.corpus import builtin_corpus, split_documents
from moetron.data.dataset import FORMAT, META_FILE, TOKENIZER_FILE, shard_name
from moetron.data.sources import check_input_path, read_documents
from moetron.data.tokenizer import Tokenizer, builtin_tokenizer, encode_documents, token_dtype

SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 8 * 2**20  # documents are tokenized in batches of about this many characters


class ShardWriter:
    """Appends token arrays to DIR/{split}_000000.bin, _000001.bin, ... of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file": name, "n_tokens": n} of the shards written so far
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens) > 0:
            if self.file is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            self.file.write(tokens[:room].tobytes())
            self.shards[-1]["n_tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        name = shard_name(self.split, len(self.shards))
        self.file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in close/_open_next)
        self.shards.append({"file": name, "n_tokens": 0})

    def close(self) -> list[dict]:
        if self.file is not None:
            self.file.close()
            self.file = None
        return self.shards


def load_tokenizer(spec: str, vocab_size: int, cache_dir: str | None = None, eos_token: str | None = None) -> Tokenizer:
    """`builtin` -> the cached built-in BPE of `vocab_size`; a tokenizer.json path or a directory holding one -> that."""
    if spec == "builtin":
        return builtin_tokenizer(vocab_size, cache_dir)
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_pretrained_dir(path, eos_token=eos_token)
    if path.is_file():
        return Tokenizer.load(path, eos_token=eos_token)
    raise FileNotFoundError(
        f"--tokenizer {spec!r}: expected 'builtin', a tokenizer.json file or a directory holding one"
    )


def _clear_output(out_dir: Path, overwrite: bool) -> None:
    old = sorted(
        [p for split in SPLITS for p in out_dir.glob(f"{split}_*.bin")]
        + [p for p in (out_dir / META_FILE,) if p.exists()]
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds prepared data ({old[0].name}, ...); pass --overwrite to replace it"
        )
    for path in old:
        path.unlink()


def prepare(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    tokenizer_name: str,
    sources: Sequence[str],
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
) -> dict:
    """Write the shards, DIR/tokenizer.json and DIR/meta.json; return the meta dict."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:  # checked before _clear_output deletes anything
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_output(out_dir, overwrite)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    n_documents = dict.fromkeys(SPLITS, 0)
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    pending_chars = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        writers[split].write(encode_documents(tokenizer, pending[split], dtype))
        pending[split], pending_chars[split] = [], 0

    try:
        for split, text in split_documents(documents, val_fraction, seed):
            pending[split].append(text)
            pending_chars[split] += len(text)
            n_documents[split] += 1
            if pending_chars[split] >= ENCODE_BATCH_CHARS:
                flush(split)
        for split in SPLITS:
            if pending[split]:
                flush(split)
    except BaseException:  # bad input half-way: leave no partial shards behind
        for writer in writers.values():
            for shard in writer.close():
                (out_dir / shard["file"]).unlink(missing_ok=True)
        raise
    shards = {split: writers[split].close() for split in SPLITS}
    if n_documents["train"] == 0:
        raise ValueError(f"no documents in {list(sources)}: nothing to prepare")

    tokenizer.save(out_dir / TOKENIZER_FILE)
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "eos_token": tokenizer.eos_token,
        "tokenizer": tokenizer_name,
        "tokenizer_file": TOKENIZER_FILE,
        "n_tokens": {split: sum(shard["n_tokens"] for shard in shards[split]) for split in SPLITS},
        "n_documents": n_documents,
        "shards": shards,
        "sources": list(sources),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / META_FILE)
    return meta


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moetron.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE", help=".txt or .jsonl files")
    parser.add_argument(
        "--builtin", action="store_true", help="also tokenize the built-in corpus (Python's documentation), first"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--tokenizer", default="builtin", help="'builtin' (BPE trained on the built-in corpus) or a tokenizer.json"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocab size of the builtin tokenizer")
    parser.add_argument(
        "--cache-dir", default=None, help="where the builtin tokenizer is cached (~/.cache/moetron/tokenizers)"
    )
    parser.add_argument(
        "--eos-token", default=None, help="end-of-document token of a tokenizer.json (default: guessed)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    parser.add_argument("--text-key", default="text", help="field of a .jsonl record that holds the document")
    parser.add_argument("--split-lines", action="store_true", help="every non-blank line of a .txt file is a document")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per .bin shard at most")
    parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    args = parser.parse_args(argv)
    if not args.input and not args.builtin:
        parser.error("give --input FILE [FILE ...] or --builtin (or both)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = [check_input_path(path) for path in args.input]  # every file checked before any work

    def documents() -> Iterable[str]:
        if args.builtin:
            yield from builtin_corpus()
        for path in paths:
            yield from read_documents(path, text_key=args.text_key, split_lines=args.split_lines)

    tokenizer = load_tokenizer(args.tokenizer, args.vocab_size, args.cache_dir, args.eos_token)
    tokenizer_name = "builtin" if args.tokenizer == "builtin" else str(Path(args.tokenizer).resolve())
    sources = (["builtin"] if args.builtin else []) + [str(path.resolve()) for path in paths]
    meta = prepare(
        documents(), args.out, tokenizer, tokenizer_name, sources,
        val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
    )  # fmt: skip
    n_tokens = ", ".join(
        f"{split} {meta['n_tokens'][split]:,} tokens / {meta['n_documents'][split]:,} docs" for split in SPLITS
    )
    print(f"wrote {args.out}: {n_tokens}; vocab_size {meta['vocab_size']}, {meta['dtype']}")
    return meta


if __name__ == "__main__":
    main()
