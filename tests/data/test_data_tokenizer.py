"""moetron.data.tokenizer: byte-level BPE round trips, EOS handling, save/load, and the built-in
tokenizer's on-disk cache (reused, and built once when two processes ask at the same time)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers

import moetron.data.tokenizer as tokenizer_module
from moetron.data import EOS_TOKEN, Tokenizer, builtin_tokenizer, encode_documents, token_dtype, train_bpe
from moetron.data.tokenizer import builtin_tokenizer_path

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Unicode: héllo wörld, 日本語, emoji 🙂🚀, tabs\tand  double  spaces\r\n",
    "A literal <|endoftext|> inside a document is text, not EOS.",
    "",
    " leading space and trailing newline\n\n",
    "\x00\x01 control bytes \x7f",
]


def test_roundtrip_and_eos(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.eos_id not in ids, f"{text!r}: the text '<|endoftext|>' must not become EOS"
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.eos_id == tokenizer.hf.token_to_id(EOS_TOKEN)
    assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN
    assert tokenizer.vocab_size == 2048  # the built-in corpus is large enough to fill the requested size


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(text) for text in TEXTS]


def test_encode_documents_appends_eos(tokenizer):
    docs = ["first doc", "second\ndoc", "third"]
    stream = encode_documents(tokenizer, docs)
    expected = [i for doc in docs for i in tokenizer.encode(doc) + [tokenizer.eos_id]]
    assert stream.dtype == np.uint16 and stream.tolist() == expected


def test_small_corpus_reports_real_vocab_size():
    tok = train_bpe(["tiny corpus tiny corpus"], vocab_size=5000)
    assert 257 <= tok.vocab_size < 5000  # 256 bytes + EOS + the few merges there are
    assert tok.decode(tok.encode("tiny corpus, and more")) == "tiny corpus, and more"
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_bpe(["x"], vocab_size=100)


def test_save_load_and_pretrained_dir(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    for loaded in (Tokenizer.load(tmp_path / "tokenizer.json"), Tokenizer.from_pretrained_dir(tmp_path)):
        assert loaded.vocab_size == tokenizer.vocab_size and loaded.eos_id == tokenizer.eos_id
        assert loaded.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path / "missing")


def test_eos_from_tokenizer_config(tmp_path):
    # A word-level tokenizer whose EOS is "</s>" (named by tokenizer_config.json) and has no <|endoftext|>.
    vocab = {"[UNK]": 0, "</s>": 1, "<eos>": 2, "hello": 3}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.add_special_tokens(["</s>", "<eos>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(tmp_path / "tokenizer.json").eos_token == "</s>"  # first known name in the vocab
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    assert Tokenizer.load(tmp_path / "tokenizer.json").eos_id == 2
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="bare.json: cannot tell the end-of-document token"):
        Tokenizer.load(tmp_path / "bare.json")


def test_builtin_cache_is_reused(tokenizer, tokenizer_cache, monkeypatch):
    path = builtin_tokenizer_path(2048, tokenizer_cache)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("builtin_tokenizer retrained although the cache holds the file")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    again = builtin_tokenizer(2048, tokenizer_cache)
    assert builtin_tokenizer_path(2048, "~/somewhere").parent == Path.home() / "somewhere"  # "~" is expanded
    assert path.stat().st_mtime_ns == mtime
    assert again.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)


# Each process builds the corpus first, then waits for a common start time so both ask for the
# tokenizer at once; it prints how many times it trained and a fingerprint of what it got.
CONCURRENT_BUILD = """
import sys, time, hashlib
import moetron.data.tokenizer as tm
from moetron.data.corpus import builtin_corpus
builtin_corpus()
trained = []
real_train = tm.train_bpe
tm.train_bpe = lambda *a, **k: trained.append(1) or real_train(*a, **k)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
tok = tm.builtin_tokenizer(512, sys.argv[1])
print(len(trained), hashlib.sha256(tok.hf.to_str().encode()).hexdigest())
"""


def test_concurrent_builds_make_one_valid_file(tmp_path):
    start_at = str(time.time() + 3.0)  # both interpreters are up and have their corpus by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_BUILD, str(tmp_path), start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        n_trained, fingerprint = out.split()
        results.append((int(n_trained), fingerprint))
    assert sum(n for n, _ in results) == 1, f"exactly one process trains: {results}"
    assert results[0][1] == results[1][1], "both processes hold the same tokenizer"
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == [builtin_tokenizer_path(512, tmp_path).name], files  # no temporary files left
    assert Tokenizer.load(tmp_path / files[0]).vocab_size == 512
    assert os.stat(tmp_path / files[0]).st_mode & 0o444 == 0o444, "a shared cache file is readable by all"


def test_token_dtype():
    assert token_dtype(2048) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        token_dtype(0)
