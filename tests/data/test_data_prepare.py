"""moetron.data.prepare and moetron.data.sources: shards hold exactly the tokenizer's encodings with
EOS after every document; bad inputs and damaged shards fail naming the file and the position."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from moetron.data import Tokenizer, TokenStream, builtin_token_streams, read_meta, split_corpus
from moetron.data.prepare import main as prepare_main


def expected_stream(tokenizer, docs):
    return [i for doc in docs for i in tokenizer.encode(doc) + [tokenizer.eos_id]]


def run_prepare(inputs, out, tokenizer_json, *extra):
    args = ["--input", *map(str, inputs), "--out", str(out), "--tokenizer", str(tokenizer_json)]
    return prepare_main([*args, "--val-fraction", "0", *extra])


@pytest.fixture
def inputs(tmp_path):
    """Two .txt files and a .jsonl file, with their documents in reading order."""
    txt_a = tmp_path / "a.txt"
    txt_a.write_text("The first file is one document.\nIt has two lines, ünïcode and 🙂.\n", encoding="utf-8")
    txt_b = tmp_path / "b.txt"
    txt_b.write_text("line one\n\n   \nline two\n", encoding="utf-8")
    records = [{"text": "json doc one", "id": 1}, {"text": "json doc\ntwo", "id": 2}, {"text": "", "id": 3}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    docs = [txt_a.read_text(encoding="utf-8"), txt_b.read_text(encoding="utf-8"), "json doc one", "json doc\ntwo"]
    return [txt_a, txt_b, jsonl], docs


def test_txt_and_jsonl_shards_hold_the_encodings(inputs, tokenizer, tokenizer_json, tmp_path):
    paths, docs = inputs
    meta = run_prepare(paths, tmp_path / "out", tokenizer_json, "--shard-tokens", "7")
    stream = TokenStream.from_dir(tmp_path / "out", "train")
    expected = expected_stream(tokenizer, docs)  # the empty JSONL text is skipped
    assert stream[:].tolist() == expected
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tokenizer.eos_id and meta["vocab_size"] == 2048
    assert meta["n_tokens"] == {"train": len(expected), "val": 0} and meta["n_documents"]["train"] == 4
    sizes = [shard["n_tokens"] for shard in meta["shards"]["train"]]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7  # documents continue across shards
    assert [shard["file"] for shard in meta["shards"]["train"]][:2] == ["train_000000.bin", "train_000001.bin"]
    assert meta["sources"] == [str(p.resolve()) for p in paths]
    copied = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert copied.encode_batch(docs) == tokenizer.encode_batch(docs)


def test_split_lines_and_val_split(inputs, tokenizer, tokenizer_json, tmp_path):
    paths, _ = inputs
    out = tmp_path / "out"
    prepare_main(
        ["--input", str(paths[1]), "--out", str(out), "--tokenizer", str(tokenizer_json)]
        + ["--split-lines", "--val-fraction", "0.5", "--seed", "1"]
    )
    train_docs, val_docs = split_corpus(["line one", "line two"], 0.5, seed=1)  # blank lines are no documents
    assert TokenStream.from_dir(out, "train")[:].tolist() == expected_stream(tokenizer, train_docs)
    assert TokenStream.from_dir(out, "val")[:].tolist() == expected_stream(tokenizer, val_docs)
    assert len(train_docs) == len(val_docs) == 1


def test_builtin_prepare_equals_in_memory_streams(tokenizer_cache, tmp_path):
    out = tmp_path / "builtin"
    prepare_main(["--builtin", "--out", str(out), "--vocab-size", "2048", "--cache-dir", str(tokenizer_cache)])
    tok, train, val = builtin_token_streams(2048, tokenizer_cache, val_fraction=0.01, seed=0)
    assert np.array_equal(TokenStream.from_dir(out, "train")[:], train[:])
    assert np.array_equal(TokenStream.from_dir(out, "val")[:], val[:])
    assert read_meta(out)["tokenizer"] == "builtin" and read_meta(out)["sources"] == ["builtin"]
    assert len(val) > 0 and len(train) > 100 * len(val) / 2


def test_uint32_for_a_large_vocab(tmp_path):
    # A word-level tokenizer with 70,000 ids: ids above 65535 need uint32 storage.
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "big.json"))
    (tmp_path / "doc.txt").write_text("w5 w69999 w65536 w1")
    meta = run_prepare([tmp_path / "doc.txt"], tmp_path / "out", tmp_path / "big.json")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    assert TokenStream.from_dir(tmp_path / "out", "train")[:].tolist() == [5, 69_999, 65_536, 1, 70_001]
    assert (tmp_path / "out" / "train_000000.bin").stat().st_size == 5 * 4


def test_cli_entry_point(inputs, tokenizer_json, tmp_path):
    paths, _ = inputs
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "moetron.data.prepare", "--input", str(paths[2]), "--out", str(out)]
    result = subprocess.run([*cmd, "--tokenizer", str(tokenizer_json)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and read_meta(out)["n_documents"] == {"train": 1, "val": 1}
    again = subprocess.run([*cmd, "--tokenizer", str(tokenizer_json)], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr, "existing prepared data is not clobbered"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": broken}\n', r"bad.jsonl:3: invalid JSON at column 10"),
        (
            "key.jsonl",
            b'{"text": "ok"}\n{"body": "no text field"}\n',
            r"key.jsonl:2: no field 'text' \(fields: \['body'\]\)",
        ),
        ("type.jsonl", b'{"text": 5}\n', r"type.jsonl:1: field 'text' is a int, expected a string"),
        ("list.jsonl", b'["text"]\n', r"list.jsonl:1: expected a JSON object, got list"),
        (
            "utf8.jsonl",
            b'{"text": "ok"}\n{"text": "b\xffd"}\n',
            r"utf8.jsonl:2: invalid UTF-8 at byte offset 26 \(byte 0xff",
        ),
        ("utf8.txt", b"line one\nab\xc3(cd", r"utf8.txt:2: invalid UTF-8 at byte offset 11 \(byte 0xc3"),
        (
            "surrogate.jsonl",
            b'{"text": "a\\ud800b"}\n',
            r"surrogate.jsonl:1: field 'text' has a lone surrogate at character 1",
        ),
        ("empty.txt", b"", r"empty.txt: no text"),
        ("blank.jsonl", b"\n\n", r"blank.jsonl: no documents"),
        ("empty_texts.jsonl", b'{"text": ""}\n', r"empty_texts.jsonl: no documents"),
        ("data.csv", b"a,b\n", r"data.csv: unsupported extension '.csv'; expected one of \['.txt', '.jsonl'\]"),
    ],
)
def test_bad_inputs_name_file_and_position(name, content, message, tokenizer_json, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a good document comes first, so shards have been started when the error hits")
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_prepare([good, bad], out, tokenizer_json)
    assert not list(out.glob("*.bin")) and not (out / "meta.json").exists(), "no partial output is left"


def test_missing_input_file(tokenizer_json, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        run_prepare([tmp_path / "nope.txt"], tmp_path / "out", tokenizer_json)


@pytest.fixture
def prepared(tokenizer_json, tmp_path):
    """A prepared directory with three train shards of 40 tokens at most."""
    (tmp_path / "doc.txt").write_text(" ".join(f"word{i}" for i in range(60)))
    out = tmp_path / "prepared"
    meta = run_prepare([tmp_path / "doc.txt"], out, tokenizer_json, "--shard-tokens", "40")
    assert len(meta["shards"]["train"]) >= 3
    return out


def test_truncated_shard_is_rejected(prepared):
    shard = prepared / "train_000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # half a uint16 token
    with pytest.raises(
        ValueError, match=r"train_000001.bin: size 79 bytes is not a multiple of the uint16 size.*byte offset 78"
    ):
        TokenStream.from_dir(prepared, "train")
    shard.write_bytes(data[:-2])  # a whole token short
    with pytest.raises(ValueError, match=r"train_000001.bin: holds 39 tokens \(78 bytes\) but .*meta.json says 40"):
        TokenStream.from_dir(prepared, "train")


def test_out_of_range_token_is_rejected(prepared):
    shard = prepared / "train_000002.bin"
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[5] = 3000  # vocab_size is 2048
    tokens.tofile(shard)
    with pytest.raises(
        ValueError, match=r"train_000002.bin: token 5 \(byte offset 10\) is 3000, outside the vocabulary \[0, 2048\)"
    ):
        TokenStream.from_dir(prepared, "train")
    assert len(TokenStream.from_dir(prepared, "train", check_tokens=False)) > 0  # the scan can be skipped


def test_meta_problems(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"split 'val' has no shards \(splits with data: \['train'\]\)"):
        TokenStream.from_dir(prepared, "val")
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"eos_id": 5000}))
    with pytest.raises(ValueError, match=r"meta.json: eos_id 5000 is not in \[0, vocab_size=2048\)"):
        TokenStream.from_dir(prepared, "train")
    (prepared / "meta.json").write_text(json.dumps(meta | {"dtype": "int8"}))
    with pytest.raises(ValueError, match=r"meta.json: dtype 'int8' is not one of \['uint16', 'uint32'\]"):
        TokenStream.from_dir(prepared, "train")
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        TokenStream.from_dir(tmp_path / "nowhere", "train")
