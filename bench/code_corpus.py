"""A larger offline corpus for convergence runs: the Python standard library's source code, as prepared token shards.

The built-in corpus (the standard library's documentation) holds ~0.33M training tokens, so the 300 steps of 4 x 2048
tokens of `bench/fp8_convergence.py` read it ~7.5 times: by the end the model memorizes it (training loss ~4.1
against a held-out ~5.0 on deepseek_v3_mini), a regime unlike pretraining. The standard library's `.py` files, on
every machine with Python and nothing to download, are several MB of text, and with the built-in 8192-token BPE
(trained on the documentation) millions of tokens: 9.2M training tokens from 1790 files of this CPU machine's Python
3.11, 3.1M from 574 files of the GPU machine's Debian Python 3.12 (which ships the test suite apart). 300 steps of
8192 tokens (2.46M) then read each training token at most once (the count is printed and kept in meta.json;
`bench/fp8_convergence.py --data-path DIR` records the share of an epoch the runs read, `data.epochs_read`).

Files are read in sorted path order (site-packages and dist-packages left out; a file that is not UTF-8 is skipped
and counted), one document per file, and split into train and val by `moetron.data.prepare` (seeded, per document).
So two machines with the same Python installation (version and packaging) prepare the same shards.

    python bench/code_corpus.py --out /tmp/stdlib_code [--vocab-size 8192] [--val-fraction 0.02] [--max-chars N]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moetron.data.prepare import load_tokenizer, prepare  # noqa: E402

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_source_files(stdlib: str | Path | None = None) -> list[Path]:
    """Every .py file under the standard library's directory, sorted, outside installed third-party packages."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts)]
    if not files:
        raise FileNotFoundError(f"no .py files under {stdlib}: is this Python's standard library directory?")
    return sorted(files)


def read_sources(files: list[Path], max_chars: int | None = None, skipped: list[Path] | None = None) -> Iterator[str]:
    """The text of each file (one document each) until `max_chars` characters were yielded; files that are not
    UTF-8, or are empty, are appended to `skipped`."""
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            text = ""
        if not text.strip():
            if skipped is not None:
                skipped.append(path)
            continue
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


def prepare_stdlib_code(
    out_dir: str | Path,
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    cache_dir: str | None = None,
    max_chars: int | None = None,
    seed: int = 0,
) -> dict:
    """Tokenize the standard library's source with the built-in BPE into `out_dir` (replacing what it held);
    returns `moetron.data.prepare`'s meta dict plus `stdlib`, `n_files` and `n_skipped`."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files, skipped = stdlib_source_files(stdlib), []
    tokenizer = load_tokenizer("builtin", vocab_size, cache_dir)
    meta = prepare(
        read_sources(files, max_chars, skipped), out_dir, tokenizer, f"builtin-{vocab_size}",
        [f"{stdlib}/**/*.py"], val_fraction=val_fraction, seed=seed, overwrite=True,
    )  # fmt: skip
    return {**meta, "stdlib": stdlib, "n_files": len(files), "n_skipped": len(skipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the shards (replaced if it holds some)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="the built-in BPE's size (data.vocab_size)")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share of the files held out")
    parser.add_argument("--cache-dir", default=None, help="the built-in tokenizer's cache (~/.cache/moetron)")
    parser.add_argument("--max-chars", type=int, default=None, help="stop after about this many characters (tests)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    meta = prepare_stdlib_code(args.out, args.vocab_size, args.val_fraction, args.cache_dir, args.max_chars)
    print(
        f"{args.out}: {meta['n_tokens']['train']} train and {meta['n_tokens']['val']} val tokens from "
        f"{meta['n_documents']['train'] + meta['n_documents']['val']} of {meta['n_files']} files in {meta['stdlib']} "
        f"({meta['n_skipped']} skipped) in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
